"""The page's class / prompt boxes for a conditional model (issue 16): one on the Generate tab,
one for uploads and drawings; hidden for an unconditional model (whose queries take none).

A class-conditional model gets a drop-down of its class names (the index's class map, else the
model's conditioning.json, else the ids its class embedding takes; any other name or id may be
typed), a text-conditional one a prompt box. What is chosen reaches `Explorer.generated`,
`uploaded` and `drawn`, which read it through `index.conditions.query_condition`. The audit and
compare tabs' boxes (`explorer/views.py`) have one more choice, first, that stands for no class
given (`EVERY_CLASS`: the audit's samples take each class in turn; `OWN_CONDITION`: a training
image is compared under its own); `given` reads it as None.
"""

from __future__ import annotations

import gradio as gr

from explorer.service import Explorer
from index.conditions import manifest_family


def class_names(ex: Explorer) -> list[str]:
    """The class names a query may take, by id."""
    cmap = None
    if ex.ready:
        cmap = manifest_family(ex.index(None).manifest)["class_map"]
    cmap = cmap or ex.model.class_map
    if cmap:
        return [n for n, _ in sorted(cmap.items(), key=lambda kv: (kv[1], kv[0]))]
    n = ex.model.unet.config.get("num_class_embeds") or 0
    return [str(i) for i in range(n)]


EVERY_CLASS = "each class in turn"
OWN_CONDITION = "its own"


def condition_box(ex: Explorer, elem_id: str, none_given: str | None = None, placeholder: str | None = None):
    """A class drop-down, a prompt box, or (unconditional) a hidden empty box. `none_given`: a
    first choice of the drop-down, its default, that stands for no class (`given`); `placeholder`:
    the prompt box's."""
    kind = ex.model.condition_kind
    if kind == "class":
        names = ([none_given] if none_given else []) + class_names(ex)
        return gr.Dropdown(
            names,
            value=names[0] if names else None,
            label="class (a name or an id)",
            allow_custom_value=True,
            elem_id=elem_id,
            min_width=70,
        )
    return gr.Textbox(
        "",
        label="prompt",
        placeholder=placeholder or "the text the image is generated or attributed under",
        visible=kind == "text",
        elem_id=elem_id,
        max_lines=2,
    )


def given(value, none_given: str | None = None) -> str | None:
    """A box's value as a condition: None where it is empty or the `none_given` choice."""
    text = "" if value is None else str(value).strip()
    return None if not text or text == none_given else text
