"""The app's API: the page's attribution as JSON, `/attribute` (an image file) and
`/attribute_generated` (seed, sampler, steps), on hidden components of the same Blocks."""

from __future__ import annotations

from collections.abc import Callable

import gradio as gr

from attribution.errors import AttributionError
from attribution.sample import SAMPLERS
from explorer.render import plain
from explorer.service import Busy, Explorer, Query

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
        api_out = gr.JSON(label="result")
        api_btn = gr.Button("attribute")
        api_gen_btn = gr.Button("attribute_generated")

    def api_call(make: Callable[[], Query], method_label, kk) -> dict:
        try:
            kk = ex.check_k(kk)  # refused before any sampling
            return ex.attribute(make(), method_label or None, kk).data
        except EXPECTED as e:
            raise gr.Error(plain(str(e)), print_exception=False) from None

    def attribute(image, k, method):
        """Top-k proponents and opponents of an image file (PNG, JPEG, …), and all N scores.

        Returns {query, settings, index (provenance), proponents, opponents (each a list of
        {rank, row, score, label, source}), scores (all N, by training row), timings_s}.
        """
        return api_call(lambda: ex.uploaded(image), method, k)

    def attribute_generated(seed, sampler, steps, k, method):
        """Generate an image (seed, ddim|ddpm, steps) and attribute it; same JSON as /attribute."""
        return api_call(lambda: ex.generated(seed, sampler, steps), method, k)

    api_btn.click(attribute, [api_file, api_k, api_method], api_out, api_name="attribute")
    api_gen_btn.click(
        attribute_generated,
        [api_seed, api_sampler, api_steps, api_k, api_method],
        api_out,
        api_name="attribute_generated",
    )
    return api_method
