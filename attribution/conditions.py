"""Conditions: what a conditional denoiser is given besides (x_t, t), as data.

Two levels:

- `Conditions` (data): one per image of a dataset, read from its folder layout
  (`attribution/data.py`): class ids with the class map (name -> id) they came from, or texts.
- `Cond` (the denoiser's inputs): one per example or row, what the forward call takes: class ids
  (`class_labels=`) and/or text-encoder states (`encoder_hidden_states=`). Text states are kept
  as a table of the distinct prompts (U, L, E) plus an index per example, so thousands of images
  with a few prompts do not hold thousands of copies; rows materialise their states only when
  the denoiser is called.

`denoise(unet, x, t, cond)` is the one place a denoiser is called with its condition; every
measurement, the curvature, the features and sampling go through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attribution.errors import DataError

KINDS = ("none", "class", "text")


@dataclass
class Conditions:
    """Per-image conditions of a dataset: `kind` "class" (labels (N,) int64 and the class map
    name -> id they were read with) or "text" (texts, one per image)."""

    kind: str
    labels: torch.Tensor | None = None
    texts: list[str] | None = None
    class_map: dict[str, int] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("class", "text"):
            raise ValueError(f"condition kind must be class or text, not {self.kind!r}")
        if (self.kind == "class") != (self.labels is not None) or (self.kind == "text") != (
            self.texts is not None
        ):
            raise ValueError("class conditions need labels, text conditions need texts")

    def __len__(self) -> int:
        return len(self.texts) if self.kind == "text" else int(self.labels.shape[0])

    def subset(self, rows) -> Conditions:
        rows = torch.as_tensor(rows, dtype=torch.long)
        if self.kind == "text":
            return Conditions("text", texts=[self.texts[i] for i in rows.tolist()])
        return Conditions("class", labels=self.labels[rows], class_map=self.class_map)

    def shown(self, i: int) -> str:
        """Condition i as a person reads it: the class name (and id) or the text."""
        if self.kind == "text":
            return self.texts[i]
        c = int(self.labels[i])
        names = [n for n, v in (self.class_map or {}).items() if v == c and n != str(c)]
        return f"{names[0]} (class {c})" if names else f"class {c}"

    def class_names(self) -> list[str]:
        """Class conditions as the names they map from (the id itself where the map has none)."""
        inverse = {v: n for n, v in (self.class_map or {}).items()}
        return [inverse.get(int(c), str(int(c))) for c in self.labels]

    @classmethod
    def classes(cls, labels, class_map: dict[str, int] | None = None) -> Conditions:
        return cls("class", labels=torch.as_tensor(labels, dtype=torch.long).reshape(-1), class_map=class_map)

    @classmethod
    def prompts(cls, texts: list[str]) -> Conditions:
        return cls("text", texts=[str(t) for t in texts])


def class_ids(names: list[str], known: dict[str, int] | None = None) -> tuple[list[int], dict[str, int]]:
    """Class names (folder names or metadata labels) -> (ids, map). With `known` (the training
    set's or the model's map) names are looked up there, integer names standing for themselves;
    else integer names are the ids when every name is an integer, and otherwise the distinct
    names take ids 0, 1, … in sorted order (torchvision's ImageFolder convention)."""
    distinct = sorted(set(names))
    if known is not None:
        missing = [n for n in distinct if n not in known and not _is_int(n)]
        if missing:
            raise DataError(
                f"class {missing[0]!r} is not one of the training classes ({', '.join(sorted(known))})"
            )
        mapping = {n: known[n] if n in known else int(n) for n in distinct}
    elif all(_is_int(n) for n in distinct):
        mapping = {n: int(n) for n in distinct}
    else:
        mapping = {n: i for i, n in enumerate(distinct)}
    return [mapping[n] for n in names], mapping


def _is_int(name: str) -> bool:
    return name.isascii() and name.isdigit()


@dataclass
class Cond:
    """The denoiser's condition for B examples (or rows): class ids (B,) and/or text states, a
    table (U, L, E) of distinct prompts' encoder states with one index (B,) per example."""

    labels: torch.Tensor | None = None
    table: torch.Tensor | None = None
    ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return int((self.labels if self.labels is not None else self.ids).shape[0])

    def __getitem__(self, idx) -> Cond:
        if isinstance(idx, (list, range)):
            idx = torch.as_tensor(list(idx), dtype=torch.long)
        return Cond(
            _map(self.labels, lambda v: v[_on(idx, v)]), self.table, _map(self.ids, lambda v: v[_on(idx, v)])
        )

    def repeat(self, k: int) -> Cond:
        """Each example's condition k times in a row: example-major rows, as `Rows` are."""
        return Cond(
            _map(self.labels, lambda v: v.repeat_interleave(k, dim=0)),
            self.table,
            _map(self.ids, lambda v: v.repeat_interleave(k, dim=0)),
        )

    def to(self, device) -> Cond:
        return Cond(*(_map(v, lambda v: v.to(device)) for v in (self.labels, self.table, self.ids)))

    def kwargs(self) -> dict:
        """The keyword arguments of the denoiser's forward call."""
        kw = {}
        if self.labels is not None:
            kw["class_labels"] = self.labels
        if self.table is not None:
            kw["encoder_hidden_states"] = self.table[self.ids]
        return kw

    @staticmethod
    def cat(parts: list[Cond]) -> Cond:
        """Examples of several Conds one after the other (their text tables stacked)."""
        labels = None if parts[0].labels is None else torch.cat([p.labels for p in parts])
        if parts[0].table is None:
            return Cond(labels)
        offsets = torch.tensor([0] + [p.table.shape[0] for p in parts[:-1]]).cumsum(0).tolist()
        ids = torch.cat([p.ids + off for p, off in zip(parts, offsets)])
        return Cond(labels, torch.cat([p.table for p in parts]), ids)


def _map(v, f):
    return None if v is None else f(v)


def _on(idx, v: torch.Tensor):
    """An index for `v`: a tensor index moved to v's device, a slice as it is."""
    return idx.to(v.device) if torch.is_tensor(idx) else idx


def select(cond: Cond | None, idx) -> Cond | None:
    """`cond[idx]`, passing None (an unconditional model) through."""
    return None if cond is None else cond[idx]


def denoise(
    unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond | None = None
) -> torch.Tensor:
    """The denoiser's output (in its own parameterisation) for x_t at t under `cond`; of a
    learned-variance output (twice the input's channels: DiT), the prediction half."""
    out = unet(x, t).sample if cond is None else unet(x, t, **cond.to(x.device).kwargs()).sample
    return out[:, : x.shape[1]] if out.shape[1] == 2 * x.shape[1] else out


def as_cond(model, c: Cond | Conditions | None, n: int) -> Cond | None:
    """The denoiser's condition of n examples from a `Cond`, a dataset's `Conditions` or None;
    None for an unconditional model (whatever was given); DataError if a conditional model gets
    none or the wrong number."""
    kind = getattr(model, "condition_kind", "none")
    if kind == "none":
        return None
    if isinstance(c, Conditions):
        c = model.condition(c)
    if c is None:
        raise DataError(f"the model is {kind}-conditional: every image needs a {kind} (none given)")
    if len(c) != n:
        raise DataError(f"{len(c)} conditions for {n} images")
    return c
