"""The model selector (issue 16 item 5): `serve --model A,B` gives one tab per model, each answering
from its own default index; every later model's API names take a prefix made of its name
(`/mnist_latent_attribute_generated_conditional`). A tiny pixel model and the shipped
class-conditional latent model (`mnist-latent`), over small indexes built here."""

from __future__ import annotations

import pytest

from explorer import launch

PUBLIC = {
    "attribute",
    "attribute_generated",
    "attribute_by_band",
    "attribute_conditional",
    "attribute_generated_conditional",
    "self_influence",
    "compare",
}


@pytest.fixture(scope="module")
def latent_index(tmp_path_factory):
    from attribution.influence import AttributionConfig
    from attribution.model import load_model
    from index.build import build_index
    from index.conditions import training_data

    model = load_model("mnist-latent")
    cfg = AttributionConfig(
        method="ekfac", draws=4, curvature_draws=1, query_draws=8, dim=1024, curvature_min_rows=80
    )
    out = tmp_path_factory.mktemp("latent") / "index"
    data = training_data("mnist", model, 40)
    return build_index(model, data, out, cfg, model_path="mnist-latent", data_spec="mnist", progress=False)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tiny_workspace, latent_index, free_port):
    """`serve --model TINY,mnist-latent` (each model's default index pointed at a small one), live."""
    mp = pytest.MonkeyPatch()
    pixel = str(tiny_workspace.model_dir)
    where = {pixel: tiny_workspace.index("ekfac"), "mnist-latent": latent_index}
    mp.setattr(launch, "default_index", lambda name: where[name])
    mp.setattr(launch, "restrict_image_decoders", lambda: None)  # process-wide; tested elsewhere
    served = []
    mp.setattr(launch, "serve", lambda demo, host, port, **kw: served.append(demo))
    port = free_port()
    try:
        assert launch.main(launch.parse_args(["--model", f"{pixel},mnist-latent", "--port", str(port)])) == 0
    finally:
        mp.undo()
    demo = served[-1]
    launch.serve(demo, "127.0.0.1", port, prevent_thread_lock=True, warmup=False)
    yield demo, f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.mark.slow  # two models, a small latent index, a server
def test_two_models_two_tabs_and_both_apis(two_models):
    from gradio_client import Client

    demo, url = two_models
    assert [ex.model.condition_kind for ex in demo.explorers] == ["none", "class"]
    client = Client(url, verbose=False)
    a = client.predict(0, "ddim", 4, 3, None, api_name="/attribute_generated")
    assert a["index"]["model"]["condition_kind"] == "none" and len(a["proponents"]) == 3
    names = {f.api_name for f in demo.fns.values() if isinstance(f.api_name, str)}
    assert PUBLIC <= names and {f"mnist_latent_{n}" for n in PUBLIC} <= names
    assert not {f"{n}_1" for n in PUBLIC} & names
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {f"/{n}" for n in PUBLIC} | {f"/mnist_latent_{n}" for n in PUBLIC} <= set(api)
    cond = [p for p in api["/mnist_latent_compare"]["parameters"] if p["parameter_name"] == "condition"]
    assert cond and cond[0]["parameter_has_default"] and cond[0]["parameter_default"] == ""
    b = client.predict(0, "ddim", 10, "3", 3, None, api_name="/mnist_latent_attribute_generated_conditional")
    assert b["query"]["condition"] == "class 3" and b["index"]["model"]["family"] == "latent"
    assert "guidance_scale" not in a["query"]  # an unconditional model samples unguided
    assert b["query"]["guidance_scale"] == 2.0 and "guidance 2" in b["query"]["description"]  # its own
    assert len(b["proponents"]) == 3


@pytest.mark.browser
@pytest.mark.slow
def test_the_browser_picks_the_latent_model_and_generates_a_class(two_models, browser):
    _, url = two_models
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(120_000)
    try:
        page.goto(url)
        page.get_by_role("tab", name="mnist-latent").click()
        page.locator("#gen-condition input >> visible=true").click()
        page.get_by_role("option", name="3", exact=True).click()
        page.locator("#steps input >> visible=true").fill("10")
        page.locator("#generate-btn >> visible=true").click()
        status = page.locator("#status >> visible=true")
        page.wait_for_function(
            "() => [...document.querySelectorAll('#status')].some(e => e.offsetParent && e.innerText.includes('Top proponent'))"
        )
        assert "Top proponent" in status.inner_text()
        assert "class 3" in page.locator("#query-info >> visible=true").inner_text()
        assert page.locator("#proponents >> visible=true").locator("img").count() >= 1
    finally:
        page.close()


def test_api_prefixes_are_made_of_model_names():
    assert launch.api_prefix("mnist-latent") == "mnist_latent"
    assert launch.api_prefix("/data/My Model.v2/") == "my_model_v2"
    assert launch.api_prefix("--") == "model"


def test_several_models_take_no_index_flag(capsys):
    args = launch.parse_args(["--model", "mnist-unet,mnist-latent", "--index", "indexes/x"])
    assert launch.main(args) == 2
    assert "each uses its own default index" in capsys.readouterr().err
