"""The app's API: the page's attribution as JSON, `/attribute` (an image file) and
`/attribute_generated` (seed, sampler, steps), each with the scores split by timestep band, and
for a conditional model `/attribute_conditional` and `/attribute_generated_conditional` (the same
with the query's class or prompt);
`/self_influence` (the memorisation audit) and `/compare` (two methods on one query), each with
an optional `condition` for a conditional model (a class or prompt; refused by an unconditional
one); all on hidden components of the same Blocks."""

from __future__ import annotations

from collections.abc import Callable

import gradio as gr

from attribution.bands import DEFAULT_BANDS
from attribution.errors import AttributionError
from attribution.sample import SAMPLERS
from explorer import audit
from explorer.render import plain
from explorer.service import ALL_TIMESTEPS, Busy, Explorer, Query

EXPECTED = (AttributionError, Busy)  # failures whose message is for the user (no traceback)


def add_api(ex: Explorer, default_label: str | None) -> gr.Dropdown:
    """The API: the same attribution as JSON (hidden components). Returns its method choice."""
    with gr.Row(visible=False):
        api_file = gr.File(type="filepath", label="image")
        api_k = gr.Number(8, precision=0, label="k")
        api_method = gr.Dropdown(ex.labels, value=default_label, label="method", allow_custom_value=True)
        api_seed = gr.Number(0, precision=0, label="seed")
        api_sampler = gr.Dropdown(list(SAMPLERS), value="ddim", label="sampler")
        api_steps = gr.Number(50, precision=0, label="steps")
        api_bands = gr.Number(DEFAULT_BANDS, precision=0, label="bands")
        api_rank = gr.Textbox(ALL_TIMESTEPS, label="rank_by")
        api_out = gr.JSON(label="result")
        api_btn = gr.Button("attribute")
        api_gen_btn = gr.Button("attribute_generated")
        api_band_btn = gr.Button("attribute_by_band")

    def api_call(make: Callable[[], Query], method_label, kk, bands, rank_by) -> dict:
        try:
            kk = ex.check_k(kk)  # refused before any sampling
            return ex.attribute(make(), method_label or None, kk, bands, rank_by or None).data
        except EXPECTED as e:
            raise gr.Error(plain(str(e)), print_exception=False) from None

    def attribute(image, k, method):
        """Top-k proponents and opponents of an image file (PNG, JPEG, …), and all N scores.

        Returns {query, settings, index (provenance), proponents, opponents (each a list of
        {rank, row, score, label, source, se, …, bands: the score's parts by timestep band, which
        add up to it}), bands ({edges, names, ranked_by}: 4 bands), scores (all N, by training
        row), timings_s}.
        """
        return api_call(lambda: ex.uploaded(image), method, k, DEFAULT_BANDS, None)

    def attribute_generated(seed, sampler, steps, k, method):
        """Generate an image (seed, ddim|ddpm, steps) and attribute it; same JSON as /attribute."""
        return api_call(lambda: ex.generated(seed, sampler, steps), method, k, DEFAULT_BANDS, None)

    def attribute_by_band(image, k, method, bands=DEFAULT_BANDS, rank_by=ALL_TIMESTEPS):
        """As /attribute with `bands` timestep bands (2, 4 or 10; 0: no split) and the top-k ranked
        by one band's part alone (`rank_by`: its name or index; "all timesteps": the whole score)."""
        return api_call(lambda: ex.uploaded(image), method, k, bands, rank_by)

    api_btn.click(attribute, [api_file, api_k, api_method], api_out, api_name="attribute")
    api_gen_btn.click(
        attribute_generated,
        [api_seed, api_sampler, api_steps, api_k, api_method],
        api_out,
        api_name="attribute_generated",
    )
    api_band_btn.click(
        attribute_by_band,
        [api_file, api_k, api_method, api_bands, api_rank],
        api_out,
        api_name="attribute_by_band",
    )
    _add_conditional_api(ex, default_label, api_call)
    _add_views_api(ex, default_label)
    return api_method


def _add_conditional_api(ex: Explorer, default_label: str | None, api_call) -> None:
    """`/attribute_conditional` and `/attribute_generated_conditional`: the same attribution for a
    conditional model's query, with its class (name or id) or prompt (hidden components)."""
    with gr.Row(visible=False):
        image = gr.File(type="filepath", label="image")
        condition = gr.Textbox("", label="condition")
        k = gr.Number(8, precision=0, label="k")
        method = gr.Dropdown(ex.labels, value=default_label, label="method", allow_custom_value=True)
        seed = gr.Number(0, precision=0, label="seed")
        sampler = gr.Dropdown(list(SAMPLERS), value="ddim", label="sampler")
        steps = gr.Number(50, precision=0, label="steps")
        out = gr.JSON(label="result")
        up_btn, gen_btn = gr.Button("attribute_conditional"), gr.Button("attribute_generated_conditional")

    def attribute_conditional(image, condition, k, method):
        """As /attribute, for a conditional model: the image attributed under `condition` (a class,
        by name or id, or a prompt); the JSON's query records it."""
        return api_call(lambda: ex.uploaded(image, condition), method, k, DEFAULT_BANDS, None)

    def attribute_generated_conditional(seed, sampler, steps, condition, k, method):
        """As /attribute_generated, for a conditional model: generated under `condition`."""
        make = lambda: ex.generated(seed, sampler, steps, condition)  # noqa: E731
        return api_call(make, method, k, DEFAULT_BANDS, None)

    up_btn.click(attribute_conditional, [image, condition, k, method], out, api_name="attribute_conditional")
    gen_btn.click(
        attribute_generated_conditional,
        [seed, sampler, steps, condition, k, method],
        out,
        api_name="attribute_generated_conditional",
    )


def _add_views_api(ex: Explorer, default_label: str | None) -> None:
    """`/self_influence` and `/compare` (hidden components)."""
    labels = ex.labels
    with gr.Row(visible=False):
        method = gr.Dropdown(labels, value=default_label, label="method", allow_custom_value=True)
        m = gr.Number(20, precision=0, label="m")
        group = gr.Checkbox(False, label="group")
        samples = gr.Number(0, precision=0, label="samples")
        seed = gr.Number(0, precision=0, label="seed")
        steps = gr.Number(50, precision=0, label="steps")
        image = gr.File(type="filepath", label="image")
        method_b = gr.Dropdown(
            labels, value=labels[1] if len(labels) > 1 else None, label="method_b", allow_custom_value=True
        )
        k = gr.Number(8, precision=0, label="k")
        condition = gr.Textbox("", label="condition")
        out = gr.JSON(label="result")
        si_btn, cmp_btn = gr.Button("self_influence"), gr.Button("compare")

    def self_influence(method, m=20, group=False, samples=0, seed=0, steps=50, condition=""):
        """The memorisation audit: the m training images with the highest and the m with the
        lowest self-influence ({highest, lowest: [{rank, row, self_influence,
        group_self_influence, label, source}], quantiles}); `group`: rank by group
        self-influence (itself and its 5 strongest proponents: catches duplicates); `samples` > 0:
        also generate that many samples (seed, DDIM steps) and pair each with its top proponent
        ({pairs: {samples: [{sample, top_row, top_score, dominance, pixel_distance, nearest_row,
        nearest_distance, …}], dominant}}); a conditional model's samples are generated and
        attributed under `condition` (a class, by name or id, or a prompt; empty: each class in
        turn), recorded in each sample's `condition`."""
        try:
            res = ex.self_influence(method or None, m, group=bool(group))
            if samples:
                pairs = ex.audit_samples(method or None, samples, seed, "ddim", steps, condition=condition)
                res["pairs"] = audit.to_json(pairs)
            return res
        except EXPECTED as e:
            raise gr.Error(plain(str(e)), print_exception=False) from None

    def compare(image, method_a, method_b, k=8, condition=""):
        """One image file attributed by two methods: {query, methods, a, b (each {proponents,
        opponents}), overlap ({proponents, opponents}: {rows, count, fraction}), spearman (of all
        N scores), spearman_over}; a conditional model's image under `condition` (a class, by
        name or id, or a prompt; required there, refused by an unconditional model), which the
        JSON records (`condition`)."""
        try:
            return ex.compare(ex.uploaded(image, condition), method_a, method_b, ex.check_k(k))
        except EXPECTED as e:
            raise gr.Error(plain(str(e)), print_exception=False) from None

    si_btn.click(
        self_influence, [method, m, group, samples, seed, steps, condition], out, api_name="self_influence"
    )
    cmp_btn.click(compare, [image, method, method_b, k, condition], out, api_name="compare")
