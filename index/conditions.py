"""Latent and conditional models in an index (issue 16): the model's family, each training row's
condition, and a query's condition, for the build, the manifest and the query side.

    settings = family_settings(settings, model, data)  # family + conditions recorded (pixel: as is)
    data = training_data("my_images/", model)          # a folder (or mnist), with its conditions
    train = training_set(model, data)                  # encoded once, conditions checked
    items = item_conditions(model, data)               # per row: {"condition": …} or {}
    check_family(manifest, model, index_dir)           # IndexLoadError on another family
    cond = query_condition(manifest, "cat")            # Conditions of one query, or None
    x = model_input(model, image)                      # an image in the denoiser's space

The family is `{"family": "pixel" | "latent", "condition_kind": "none" | "class" | "text",
"class_map": {name: id} | None}`. An unconditional pixel-space model records nothing new: its
settings, key and files are those of every index built before (a manifest without these entries
reads as pixel, unconditional); latent or conditional builds record the family in the manifest's
model section and the sha256 of the rows' conditions in its data section, so both are part of the
settings key. Encoding and conditions are the library's (`DiffusionModel.prepare`, `condition`,
`encode`: what `attribution scores` runs), never redone here.
"""

from __future__ import annotations

import hashlib
import json

import torch

from attribution.conditions import Conditions
from attribution.errors import DataError, IndexLoadError

PIXEL = {"family": "pixel", "condition_kind": "none", "class_map": None}
REBUILD = "rebuild it with `attribution index build --model … --overwrite`"


def family(model) -> dict:
    """The model's family, condition kind and class map (the model's own, conditioning.json)."""
    return {
        "family": "latent" if model.autoencoder is not None else "pixel",
        "condition_kind": model.condition_kind,
        "class_map": model.class_map,
    }


def manifest_family(manifest: dict) -> dict:
    """The family an index records (pixel, unconditional, no class map where it records none)."""
    m = manifest.get("model", {})
    return {k: m.get(k, PIXEL[k]) for k in PIXEL}


def is_plain(fam: dict) -> bool:
    """Whether a family is an unconditional pixel-space one (nothing extra recorded or asked)."""
    return fam["family"] == "pixel" and fam["condition_kind"] == "none"


def describe(fam: dict) -> str:
    """'latent, class-conditional (3 classes)' / 'pixel, unconditional' for messages and reports."""
    kind = fam["condition_kind"]
    cond = "unconditional" if kind == "none" else f"{kind}-conditional"
    if kind == "class" and fam.get("class_map"):
        cond += f" ({len(fam['class_map'])} classes)"
    return f"{fam['family']}, {cond}"


def _conditions_sha256(model, data) -> str:
    """sha256 of the rows' conditions as the model reads them (class ids, or texts)."""
    c = data.conditions
    rows = c.texts if c.kind == "text" else c.labels.tolist()
    if model.condition_kind == "text" and c.kind == "class":
        rows = c.class_names()  # a text model reads class folders as prompts
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


def family_settings(settings: dict, model, data) -> dict:
    """`settings` with a latent or conditional model's family (model section) and the sha256 of
    the training rows' conditions (data section); an unconditional pixel model's unchanged.
    Refuses (DataError) data without the conditions a conditional model needs, before any work."""
    fam = family(model)
    if is_plain(fam):
        return settings
    out = {**settings, "model": {**settings["model"], **fam}}
    if fam["condition_kind"] != "none":
        model.condition(data.conditions)  # DataError: no conditions, or ones the model cannot take
        fam["class_map"] = data.conditions.class_map or fam["class_map"]
        out["model"]["class_map"] = fam["class_map"]
        out["data"] = {
            **settings["data"],
            "conditions": {"kind": data.conditions.kind, "sha256": _conditions_sha256(model, data)},
        }
    return out


def training_data(spec: str, model, n: int | None = None):
    """The training images of a build: 'mnist' (embedded; its digit labels are the class
    conditions of a conditional model) or a folder, class names read through the model's class
    map where it records one (conditioning.json), as `attribution scores` reads them."""
    from attribution.data import image_folder, load_dataset

    if spec == "mnist" or not model.class_map:
        ds = load_dataset(spec, channels=model.channels, size=model.size, n=n)
        if spec == "mnist" and model.condition_kind != "none":
            ds.conditions = Conditions.classes(ds.labels, {str(i): i for i in range(10)})
        return ds
    ds = image_folder(spec, model.channels, model.size, class_map=model.class_map)
    return ds if n is None else ds.subset(range(min(n, len(ds))))


def training_set(model, data):
    """The training rows in the denoiser's terms: images encoded once to the autoencoder's
    posterior mean (latent models), conditions checked (`DiffusionModel.prepare`)."""
    if model.autoencoder is None and model.condition_kind == "none":
        return data  # an unconditional pixel model: the rows as they are (and no notes)
    from attribution.console import say

    if model.autoencoder is not None:
        say(f"encoding {len(data)} training images to latents (the autoencoder's posterior mean, once)")
    return model.prepare(data)


def item_conditions(model, data) -> list[dict]:
    """Each row's entry for items.jsonl: {"condition": {"class": id, "name": name}} or
    {"condition": {"text": prompt}} for a conditional model; {} otherwise (items as before)."""
    kind = model.condition_kind
    if kind == "none" or data.conditions is None:
        return [{} for _ in range(len(data))]
    c = data.conditions
    if kind == "text":
        texts = c.texts if c.kind == "text" else c.class_names()
        return [{"condition": {"text": t}} for t in texts]
    names = c.class_names()
    return [{"condition": {"class": int(i), "name": n}} for i, n in zip(c.labels.tolist(), names)]


def check_family(manifest: dict, model, index_dir) -> None:
    """IndexLoadError if the index was built for another family of model, or a class map that
    gives one of the model's class names another id."""
    have, want = family(model), manifest_family(manifest)
    if (have["family"], have["condition_kind"]) != (want["family"], want["condition_kind"]):
        raise IndexLoadError(
            f"{index_dir}: the index was built for a {describe(want)} model, this model is "
            f"{describe(have)}; {REBUILD}"
        )
    ours, theirs = have["class_map"] or {}, want["class_map"] or {}
    clash = sorted(n for n in ours.keys() & theirs.keys() if ours[n] != theirs[n])
    if clash:
        n = clash[0]
        raise IndexLoadError(
            f"{index_dir}: the index's class map gives {n!r} id {theirs[n]}, the model's gives "
            f"{ours[n]}; {REBUILD}"
        )


def class_id(value, class_map: dict | None) -> int:
    """A class given by its name in `class_map` or by its id; DataError naming the known ones."""
    text = str(value).strip()
    if class_map and text in class_map:
        return int(class_map[text])
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if text.isascii() and text.isdigit():
        return int(text)
    known = f": one of {', '.join(sorted(class_map))}, or an id" if class_map else " (give a class id)"
    raise DataError(f"unknown class {text[:40]!r}{known}")


def query_condition(manifest: dict, value) -> Conditions | None:
    """A query's condition for an index: a class (its name in the index's class map, or an id)
    or a prompt, as `Conditions` of one; None for an unconditional index. DataError if a
    conditional index gets none, or an unconditional one gets one."""
    fam = manifest_family(manifest)
    kind = fam["condition_kind"]
    if isinstance(value, Conditions):
        return value
    given = value is not None and str(value).strip() != ""
    if kind == "none":
        if given:
            raise DataError("this index's model is unconditional: it takes no class or prompt")
        return None
    if not given:
        what = "a class (its name or id)" if kind == "class" else "a prompt"
        raise DataError(f"this index's model is {kind}-conditional: give the query {what}")
    if kind == "text":
        return Conditions.prompts([str(value)])
    return Conditions.classes([class_id(value, fam["class_map"])], fam["class_map"])


def shown(cond: Conditions | None) -> str | None:
    """A query's condition as a person reads it ('cat (class 0)', the prompt), None if none."""
    return None if cond is None else cond.shown(0)


def model_input(model, image: torch.Tensor) -> torch.Tensor:
    """An image (C, H, W) in [-1, 1] in the denoiser's space: a latent model's encoding (the
    posterior mean, as for training rows), a pixel model's image itself (`DiffusionModel.encode`)."""
    return model.encode(image.unsqueeze(0))[0]
