"""Per-layer GGN curvature of the training loss: K-FAC (expand / reduce) and EK-FAC.

For the training loss (1/N) Σ_n (1/K) Σ_k ℓ_{n,k} the GGN is (1/R) Σ_r J_rᵀ (2 w_r / d) J_r over
R = N·K rows. Per layer it is approximated as A ⊗ S (Kronecker in the layout vec(W) of W (O×I')):

    expand:  A = 1/(R·P) Σ_{r,p} a aᵀ          S = 1/R Σ_{r,p} g gᵀ
    reduce:  A = 1/R Σ_r ā āᵀ (ā = mean_p a)    S = 1/R Σ_r ĝ ĝᵀ (ĝ = Σ_p g)

where g is the back-propagated output cotangent of row r:
    ggn="model"  sampled  √(2w/d)·z, z ~ N(0, I)           (MC GGN, "GGN_model", default)
    ggn="loss"   the true gradient (2w/d)(ε̂ − y)           (empirical Fisher, "GGN_loss")
    ggn="exact"  every column √(2w/d)·e_j, j = 1..d        (deterministic GGN; d backwards)

EK-FAC keeps the eigenbases Q_A, Q_S and refits the diagonal in the Kronecker eigenbasis,
Λ*[o,i] = 1/R Σ_r (Q_Sᵀ G_r Q_A)[o,i]², in a second pass over the same rows. Damping λ is exact
(added to the eigenvalues) and scale-aware: λ = damping · mean eigenvalue of the layer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from attribution.capture import (
    Recording,
    example_gradients,
    forward,
    grad_enabled_params,
    input_columns,
    project_inputs,
    tracked_layers,
)
from attribution.conditions import Cond, select
from attribution.measurements import Measurement, Rows
from attribution.seeds import GGN_SAMPLES, generator

GGN_TYPES = ("model", "loss", "exact")
SHARING = ("expand", "reduce")


@dataclass
class CurvatureConfig:
    kind: str = "ekfac"  # "kfac" | "ekfac"
    ggn: str = "model"
    sharing: str = "expand"
    draws: int = 4
    seed: int = 0
    damping: float = 0.1  # relative to the layer's mean eigenvalue (influence.DAMPING)
    stratified: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("kfac", "ekfac"):
            raise ValueError(f"curvature kind must be kfac or ekfac, not {self.kind!r}")
        if self.ggn not in GGN_TYPES:
            raise ValueError(f"ggn must be one of {GGN_TYPES}, not {self.ggn!r}")
        if self.sharing not in SHARING:
            raise ValueError(f"sharing must be one of {SHARING}, not {self.sharing!r}")


def output_cotangents(out: torch.Tensor, rows: Rows, ggn: str, keys: list[int], seed: int):
    """The cotangents to back-propagate for the GGN: a list of tensors shaped like `out`."""
    d = out[0].numel()
    scale = (2 * rows.w / d).view(-1, *([1] * (out.dim() - 1)))
    if ggn == "loss":
        return [scale * (out.detach() - rows.y)]
    if ggn == "model":
        shape = tuple(out.shape[1:])
        z = [torch.randn((rows.k, *shape), generator=generator(seed, GGN_SAMPLES, k)) for k in keys]
        return [scale.sqrt() * torch.cat(z).to(out.device)]
    cots = []
    for j in range(d):
        e = torch.zeros_like(out).flatten(1)
        e[:, j] = 1.0
        cots.append(scale.sqrt() * e.view_as(out))
    return cots


class Curvature:
    """Per-layer factors: A, S, their eigenbases, and (EK-FAC) the corrected eigenvalues."""

    def __init__(self, config: CurvatureConfig, tensors: dict[str, torch.Tensor], meta: dict | None = None):
        self.config = config
        self.t = tensors
        self.meta = meta or {}

    @property
    def layer_names(self) -> list[str]:
        return sorted({k.rsplit(".", 1)[0] for k in self.t if k.endswith(".QA")})

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, S); from their eigendecompositions where they were saved without them."""
        if f"{name}.A" in self.t:
            return self.t[f"{name}.A"], self.t[f"{name}.S"]
        ea, qa, es, qs = self.eig(name)
        return (qa * ea) @ qa.T, (qs * es) @ qs.T

    def eig(self, name: str):
        """(λ_A, Q_A, λ_S, Q_S) with eigenvalues clamped at 0."""
        return (self.t[f"{name}.eA"], self.t[f"{name}.QA"], self.t[f"{name}.eS"], self.t[f"{name}.QS"])

    def eigenvalues(self, name: str) -> torch.Tensor:
        """The (O, I') eigenvalue grid in the Kronecker eigenbasis: Λ* (EK-FAC) or λ_S λ_Aᵀ."""
        if f"{name}.lam" in self.t:
            return self.t[f"{name}.lam"]
        ea, _, es, _ = self.eig(name)
        return torch.outer(es, ea)

    def damping(self, name: str) -> float:
        """Exact damping λ of a layer: config.damping × its mean eigenvalue."""
        return float(self.config.damping * self.eigenvalues(name).mean().clamp(min=1e-30))

    def factored_damping(self, name: str) -> tuple[float, float]:
        """(δ_A, δ_S) for (A + δ_A I) ⊗ (S + δ_S I), with δ_A δ_S = λ of the same relative size."""
        ea, _, es, _ = self.eig(name)
        r = self.config.damping**0.5
        return float(r * ea.mean().clamp(min=1e-30)), float(r * es.mean().clamp(min=1e-30))

    def dense(self, name: str) -> torch.Tensor:
        """The approximate GGN block as a dense (O·I')² matrix, row-major vec(W) (tests only)."""
        ea, qa, es, qs = self.eig(name)
        lam = self.eigenvalues(name)
        q = torch.kron(qs, qa)
        return q @ torch.diag(lam.reshape(-1)) @ q.T

    def save(self, path: str | Path, factors: bool = True) -> None:
        """safetensors; `factors=False` leaves out A and S, which nothing downstream of the fit
        needs (their eigendecompositions are kept): half the file."""
        meta = {"config": json.dumps(asdict(self.config)), "meta": json.dumps(self.meta)}
        keep = {k: v for k, v in self.t.items() if factors or not k.endswith((".A", ".S"))}
        save_file({k: v.contiguous() for k, v in keep.items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> Curvature:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
        tensors = load_file(str(path))
        return cls(CurvatureConfig(**json.loads(md["config"])), tensors, json.loads(md.get("meta", "{}")))


def rotate(grad: torch.Tensor, qs: torch.Tensor, qa: torch.Tensor) -> torch.Tensor:
    """Q_Sᵀ G Q_A for formed gradients G (B, O, I') -> (B, O, I')."""
    return qs.T @ grad @ qa


def rotates_first(p: int, o: int, i: int) -> bool:
    """Whether rotating the P vectors g (O) and a (I') first, P·(O² + I'²) flops per item, is
    cheaper than forming the O × I' gradient and rotating it, O·I'·(P + O + I') flops."""
    return p * (o * o + i * i) <= o * i * (o + i)


def rotated_gradient(g: torch.Tensor, a: torch.Tensor, qs: torch.Tensor, qa: torch.Tensor) -> torch.Tensor:
    """Q_Sᵀ (Σ_p g_p a_pᵀ) Q_A for g (B, P, O), a (B, P, I') -> (B, O, I').

    Rotates the P vectors first when positions are few (P·(O² + I'²) flops per item), else
    forms the gradient first (O·I'·(P + O + I') flops per item); the result is the same.
    """
    if rotates_first(g.shape[1], g.shape[2], a.shape[2]):
        return (g @ qs).transpose(1, 2) @ (a @ qa)
    return rotate(g.transpose(1, 2) @ a, qs, qa)


def rotated_row_gradients(
    m: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, qs: torch.Tensor, qa: torch.Tensor
) -> torch.Tensor:
    """As `rotated_gradient` for every row, from the layer's raw input x (R, ...) and g (R, P, O):
    no transposed or bias-padded copy of the im2col columns is made. Rotating first projects x
    onto Q_A with a convolution (no im2col at all); forming first takes each row's conv weight
    gradient where positions outnumber inputs (high resolution), else multiplies F.unfold's columns."""
    p, i = g.shape[1], qa.shape[0]
    if rotates_first(p, g.shape[2], i):
        return (g @ qs).transpose(1, 2) @ project_inputs(m, x, qa.T)
    if isinstance(m, torch.nn.Conv2d) and p >= i:
        return rotate(example_gradients(m, x, g, g.shape[0]), qs, qa)
    u = input_columns(m, x)  # (R, I, P)
    gw = g.transpose(1, 2) @ u.transpose(1, 2)  # (R, O, I) weight part of G
    if getattr(m, "bias", None) is None:
        return qs.T @ gw @ qa
    rot = gw @ qa[:-1] + g.sum(1).unsqueeze(2) * qa[-1]  # [G_w | Σ_p g] Q_A
    return qs.T @ rot


def _gram(u: torch.Tensor) -> torch.Tensor:
    """Σ_r u_r u_rᵀ for u (R, I, P) -> (I, I), without copying u."""
    if u.shape[2] == 1:
        v = u[:, :, 0]
        return v.T @ v
    if u.transpose(1, 2).is_contiguous():  # Linear tokens: one (R·P, I) matrix
        v = u.transpose(1, 2).reshape(-1, u.shape[1])
        return v.T @ v
    return u.new_zeros(u.shape[1], u.shape[1]).addbmm_(u, u.transpose(1, 2))


def input_factor_sum(m: torch.nn.Module, x: torch.Tensor, sharing: str) -> tuple[torch.Tensor, int]:
    """(Σ a aᵀ (I', I'), number of terms) over the rows and positions of the layer input x, the
    bias entry (constant 1) included; `reduce` first averages a over positions."""
    u = input_columns(m, x)
    if sharing == "reduce":
        u = u.mean(2, keepdim=True)
    r, i, p = u.shape
    core = _gram(u)
    if getattr(m, "bias", None) is None:
        return core, r * p
    s = u.sum((0, 2))
    out = core.new_empty(i + 1, i + 1)
    out[:i, :i] = core
    out[:i, i] = s
    out[i, :i] = s
    out[i, i] = r * p
    return out, r * p


def output_factor_sum(g: torch.Tensor, sharing: str) -> torch.Tensor:
    """Σ g gᵀ (O, O) over the rows and positions of g (R, P, O); `reduce` first sums over P."""
    if sharing == "reduce":
        g = g.sum(1, keepdim=True)
    return _gram(g.transpose(1, 2))


def _eigh(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    e, q = torch.linalg.eigh(m.double())
    return e.clamp(min=0).float(), q.float()


def _passes(
    model,
    images: torch.Tensor,
    keys: list[int],
    cfg: CurvatureConfig,
    batch_size: int,
    device,
    desc: str,
    progress: bool,
    cond=None,
):
    """Yields (recording, output, rows, cotangents) per batch, with the same draws every pass."""
    meas = Measurement("loss")
    acp = model.alphas_cumprod(device)
    layers = tracked_layers(model.unet)
    bar = tqdm(total=len(keys), desc=desc, unit="img", disable=not progress)
    for i in range(0, len(keys), batch_size):
        kb = keys[i : i + batch_size]
        x0 = images[i : i + batch_size].to(device)
        c = select(cond, slice(i, i + batch_size))
        rows = meas.rows(
            x0,
            kb,
            cfg.draws,
            cfg.seed,
            acp,
            stratified=cfg.stratified,
            cond=c,
            prediction=model.prediction_type,
        )
        out, rec = forward(model.unet, layers, rows.x, rows.t, rows.c)
        cots = output_cotangents(out, rows, cfg.ggn, kb, cfg.seed)
        yield rec, out, rows, cots
        bar.update(len(kb))
    bar.close()


def _backward_all(rec: Recording, out: torch.Tensor, cots: list[torch.Tensor]):
    """Yields (name, g (R, P, O)) for every layer and cotangent."""
    for j, c in enumerate(cots):
        yield from rec.cotangents(out, c, retain_graph=j < len(cots) - 1)


def fit_curvature(
    model,
    images: torch.Tensor,
    keys: list[int] | None = None,
    config: CurvatureConfig | None = None,
    batch_size: int = 32,
    progress: bool = True,
    device: str | torch.device = "cpu",
    allreduce=None,
    cond: Cond | None = None,
) -> Curvature:
    """Fit K-FAC (and, for kind='ekfac', the eigenvalue correction) on `images` (N, C, H, W).

    `keys` identify the images for their seeded draws (default: row numbers). Under data
    parallelism each process passes its slice and `allreduce` (float64 tensor -> its sum over
    processes), which is applied to every running sum before it is normalised. `cond`: the
    images' conditions in the denoiser's terms (None for an unconditional model).
    """
    total = allreduce or (lambda x: x)
    cfg = config or CurvatureConfig()
    device = torch.device(device)
    keys = list(range(images.shape[0])) if keys is None else list(keys)
    layers = tracked_layers(model.unet)
    acc: dict[str, torch.Tensor] = {}
    n_rows, n_pos = 0, {}
    with grad_enabled_params(model.unet):
        for rec, out, rows, cots in _passes(
            model, images, keys, cfg, batch_size, device, "curvature: K-FAC factors", progress, cond
        ):
            r = rows.t.shape[0]
            n_rows += r
            for name, m in layers.items():
                a_sum, count = input_factor_sum(m, rec.inputs[name].detach(), cfg.sharing)
                acc[f"{name}.A"] = acc.get(f"{name}.A", 0) + a_sum.double()
                n_pos[name] = n_pos.get(name, 0) + count
            for name, g in _backward_all(rec, out, cots):
                acc[f"{name}.S"] = acc.get(f"{name}.S", 0) + output_factor_sum(g, cfg.sharing).double()
        acc = {k: total(v) for k, v in sorted(acc.items())}
        n_pos = {
            k: float(total(torch.tensor(float(v), dtype=torch.float64))) for k, v in sorted(n_pos.items())
        }
        n_rows = int(total(torch.tensor(float(n_rows), dtype=torch.float64)))
        tensors: dict[str, torch.Tensor] = {}
        for name in layers:
            a_mat = (acc[f"{name}.A"] / n_pos[name]).float()
            s_mat = (acc[f"{name}.S"] / n_rows).float()
            ea, qa = _eigh(a_mat)
            es, qs = _eigh(s_mat)
            tensors.update(
                {
                    f"{name}.A": a_mat,
                    f"{name}.S": s_mat,
                    f"{name}.eA": ea,
                    f"{name}.QA": qa,
                    f"{name}.eS": es,
                    f"{name}.QS": qs,
                }
            )
        if cfg.kind == "ekfac":
            lam: dict[str, torch.Tensor] = {}
            for rec, out, _rows, cots in _passes(
                model, images, keys, cfg, batch_size, device, "curvature: EK-FAC eigenvalues", progress, cond
            ):
                for name, g in _backward_all(rec, out, cots):
                    qa, qs = tensors[f"{name}.QA"].to(g.device), tensors[f"{name}.QS"].to(g.device)
                    rot = rotated_row_gradients(layers[name], rec.inputs[name].detach(), g, qs, qa)
                    lam[name] = lam.get(name, 0) + rot.pow(2).sum(0).double()
            for name in layers:
                tensors[f"{name}.lam"] = (total(lam[name]) / n_rows).float()
    tensors = {k: v.cpu() for k, v in tensors.items()}
    return Curvature(cfg, tensors, {"n_images": len(keys), "n_rows": n_rows})
