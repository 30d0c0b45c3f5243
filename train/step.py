"""Pure train and eval steps: CE + lambda * MTP + alpha * balance loss, and the bias update.

After the optimizer update the router correction bias of every MoE layer moves by
gamma * sign(mean_load - load), with loads counted over the step's whole (global) batch: an
overloaded expert becomes less likely to be picked, an idle one more (V3's auxiliary-loss-free
balancing). The weights of the chosen experts never see the bias.

Token losses are sums divided by the number of trained tokens in the whole global batch,
counted from the masks before any forward pass. A batch split into `micro_batches` (gradient
accumulation) therefore gets exactly the loss and gradients of the whole batch at once, however
its trained tokens fall between micro-batches or devices.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

import model
from model import ModelConfig
from train.kd import KDConfig, kd_sum
from train.losses import cross_entropy
from train.optimizer import LRSchedule, update_count
from train.state import TrainState


class Balancing(enum.Enum):
    """How expert load is balanced (the balance-ablation experiment compares them)."""

    LOSS_FREE = "loss_free"  # V3: bias update + a tiny sequence-wise balance loss
    AUX_LOSS = "aux_loss"  # GShard/Switch: batch-level auxiliary loss, no bias update
    NONE = "none"


class NonFinite(enum.Enum):
    """What a non-finite loss or gradient does."""

    HALT = "halt"  # the loop stops with an error (nothing is saved from the bad step)
    SKIP = "skip"  # the update is dropped, the step counted in `skipped`


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss weights and balancing, V3's defaults; optional step-based switches."""

    mtp_weight: float = 0.3  # lambda (V3: 0.3 for the first 10T tokens ...)
    mtp_weight_late: float = 0.1  # ... then 0.1
    mtp_weight_switch_step: int | None = None
    balance_weight: float = 1e-4  # alpha of the sequence-wise balance loss
    balancing: Balancing = Balancing.LOSS_FREE
    aux_loss_weight: float = 1e-2  # coefficient of the batch-level loss under AUX_LOSS
    bias_update_rate: float = 1e-3  # gamma (V3: 0.001, 0 for the last 500B tokens)
    bias_update_stop_step: int | None = None
    mask_documents: bool = False  # attend and predict only within a packed document
    nonfinite: NonFinite = NonFinite.HALT
    # Gradient accumulation: each batch runs as this many micro-batches of its rows (same loss
    # and gradients, less activation memory). Under AUX_LOSS the batch-level auxiliary loss is
    # the mean of the micro-batches' (as Megatron's); every other term is exact.
    micro_batches: int = 1

    def __post_init__(self):
        for name in ("mtp_weight", "mtp_weight_late", "balance_weight", "aux_loss_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"LossConfig.{name} = {getattr(self, name)!r}: must be >= 0")
        if not self.bias_update_rate >= 0:
            raise ValueError(
                f"LossConfig.bias_update_rate = {self.bias_update_rate!r}: must be >= 0"
            )
        if not isinstance(self.micro_batches, int) or self.micro_batches < 1:
            raise ValueError(
                f"LossConfig.micro_batches = {self.micro_batches!r}: must be an int >= 1"
            )
        for name in ("mtp_weight_switch_step", "bias_update_stop_step"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"LossConfig.{name} = {value!r}: must be None or an int >= 0")
        for name, kind in (("balancing", Balancing), ("nonfinite", NonFinite)):
            if not isinstance(getattr(self, name), kind):
                valid = [m.value for m in kind]
                raise ValueError(
                    f"LossConfig.{name} = {getattr(self, name)!r}: must be one of {valid}"
                )

    def mtp_weight_at(self, step: jax.Array) -> jax.Array:
        """lambda at a schedule step (the optimizer's update count, see `schedule_step`)."""
        if self.mtp_weight_switch_step is None:
            return jnp.asarray(self.mtp_weight, jnp.float32)
        late = step >= self.mtp_weight_switch_step
        return jnp.where(late, self.mtp_weight_late, self.mtp_weight).astype(jnp.float32)

    def bias_rate_at(self, step: jax.Array) -> jax.Array:
        """gamma at a schedule step (the optimizer's update count, see `schedule_step`)."""
        if self.balancing is not Balancing.LOSS_FREE:
            return jnp.zeros((), jnp.float32)
        if self.bias_update_stop_step is None:
            return jnp.asarray(self.bias_update_rate, jnp.float32)
        stopped = step >= self.bias_update_stop_step
        return jnp.where(stopped, 0.0, self.bias_update_rate).astype(jnp.float32)


def _masked_ce(logits, targets, mask) -> tuple[jax.Array, jax.Array]:
    """(sum of CE over masked positions, number of positions)."""
    return (cross_entropy(logits, targets) * mask).sum(), mask.sum()


def _shift(x: jax.Array, k: int) -> jax.Array:
    """x[:, i + k] at position i, zero past the end."""
    return jnp.pad(x[:, k:], ((0, 0), (0, k)))


def loss_targets(cfg: ModelConfig, batch: dict, mask_documents: bool) -> dict:
    """{name: (targets, mask)} of the main and per-depth MTP cross-entropies."""
    mask = batch["loss_mask"].astype(jnp.float32)
    out = {"ce": (batch["targets"], mask)}
    for k in range(1, cfg.mtp_depth + 1):
        # Depth k at position i predicts token i + k + 1, i.e. targets[i + k].
        mask_k = _shift(mask, k)
        if mask_documents:
            mask_k = mask_k * (_shift(batch["segment_ids"], k) == batch["segment_ids"])
        out[f"mtp_{k}"] = (_shift(batch["targets"], k), mask_k)
    return out


def token_counts(cfg: ModelConfig, batch: dict, mask_documents: bool) -> dict:
    """{name: number of trained positions} of each cross-entropy, from the masks alone."""
    return {
        name: mask.sum() for name, (_, mask) in loss_targets(cfg, batch, mask_documents).items()
    }


def token_losses(cfg: ModelConfig, out: model.Output, batch: dict, mask_documents: bool) -> dict:
    """Sums and counts of main and per-depth MTP cross-entropies over the batch."""
    logits = {"ce": out.logits} | {f"mtp_{k}": x for k, x in enumerate(out.mtp_logits, start=1)}
    targets = loss_targets(cfg, batch, mask_documents)
    return {name: _masked_ce(logits[name], *targets[name]) for name in targets}


def _mean(pair) -> jax.Array:
    total, count = pair
    return total / jnp.maximum(count, 1.0)


def forward(cfg: ModelConfig, variables: dict, batch: dict, mask_documents: bool) -> model.Output:
    return model.forward(
        cfg,
        variables,
        batch["inputs"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"] if mask_documents else None,
    )


def _sum_layers(*values) -> jax.Array:
    return sum((v.sum() for v in values if v is not None), jnp.zeros((), jnp.float32))


def max_violation(counts_LxE: jax.Array) -> jax.Array:
    """MaxVio per layer: max load / mean load - 1 (NaN for a layer that routed nothing)."""
    counts = jnp.asarray(counts_LxE, jnp.float32)
    mean = counts.mean(-1)
    return jnp.where(mean > 0, counts.max(-1) / jnp.where(mean > 0, mean, 1.0) - 1.0, jnp.nan)


def update_router_bias(router_bias: dict, aux: model.transformer.Aux, rate: jax.Array) -> dict:
    """b += rate * sign(mean_load - load) per MoE layer (and MTP block) from global counts."""

    def moved(bias_LxE, counts_LxE):
        counts = counts_LxE.astype(jnp.float32)
        return bias_LxE + rate * jnp.sign(counts.mean(-1, keepdims=True) - counts)

    new = jax.tree.map(lambda x: x, router_bias)
    if aux.expert_counts is not None:
        router = new["moe_layers"]["moe"]["router"]
        router["bias"] = moved(router["bias"], aux.expert_counts)
    if aux.mtp_expert_counts is not None:
        router = new["mtp"]["block"]["moe"]["router"]
        router["bias"] = moved(router["bias"], aux.mtp_expert_counts)
    return new


def _real_tokens(batch: dict) -> jax.Array:
    """Input positions holding a token rather than padding (segment 0)."""
    segments = batch.get("segment_ids")
    if segments is None:
        return jnp.asarray(batch["inputs"].size, jnp.float32)
    return (segments != 0).sum().astype(jnp.float32)


def objective(
    cfg: ModelConfig,
    loss_cfg: LossConfig,
    variables: dict,
    batch: dict,
    step: jax.Array,
    counts: dict | None = None,
    share: float = 1.0,
    kd: KDConfig | None = None,
) -> tuple[jax.Array, tuple[dict, model.transformer.Aux]]:
    """(CE + lambda * mean MTP CE + the configured balance term, (metrics, routing aux)); with
    `kd`, (1 - kd.weight) * CE + kd.weight * the divergence to the teacher's outputs in the
    batch (train/kd.py) in place of CE.

    For a micro-batch: `counts` are the whole batch's `token_counts` (the CE sums are divided
    by them) and `share` its fraction of the rows (it weighs the per-row balance terms), so the
    micro-batches' losses, metrics and gradients add up to the whole batch's."""
    out = forward(cfg, variables, batch, loss_cfg.mask_documents)
    sums = token_losses(cfg, out, batch, loss_cfg.mask_documents)
    if counts is None:
        counts = {name: count for name, (_, count) in sums.items()}
    ce = _mean((sums["ce"][0], counts["ce"]))
    extra = {}
    if kd is not None:
        _, mask = loss_targets(cfg, batch, loss_cfg.mask_documents)["ce"]
        extra["kd"] = _mean((kd_sum(kd, out.logits, batch, mask), counts["ce"]))
        extra["sft_ce"] = ce
        ce = (1 - kd.weight) * ce + kd.weight * extra["kd"]
    depths = [_mean((sums[f"mtp_{k}"][0], counts[f"mtp_{k}"])) for k in range(1, cfg.mtp_depth + 1)]
    mtp = jnp.mean(jnp.stack(depths)) if depths else jnp.zeros((), jnp.float32)
    aux = out.aux
    balance = share * _sum_layers(aux.balance_loss, aux.mtp_balance_loss)
    batch_balance = share * _sum_layers(aux.batch_balance_loss, aux.mtp_batch_balance_loss)
    loss = ce + loss_cfg.mtp_weight_at(step) * mtp
    if loss_cfg.balancing is Balancing.LOSS_FREE:
        loss = loss + loss_cfg.balance_weight * balance
    elif loss_cfg.balancing is Balancing.AUX_LOSS:
        loss = loss + loss_cfg.aux_loss_weight * batch_balance
    metrics = {
        "loss": loss,
        "ce": ce,
        "mtp_loss": mtp,
        "balance_loss": balance,
        "aux_loss": batch_balance,
        # Tokens processed (throughput and MFU count these) and tokens trained on (SFT's
        # prompts are processed but not trained).
        "tokens": _real_tokens(batch),
        "trained_tokens": sums["ce"][1],
        **extra,
    }
    return loss, (metrics, aux)


def schedule_step(state: TrainState) -> jax.Array:
    """The step every schedule reads: updates applied so far (the LR schedule's own count).

    A dropped (non-finite) step advances `state.step` but applies nothing, so the learning
    rate, lambda and gamma all stay where the optimizer is; keying the switches on
    `state.step` instead would move them ahead of the learning rate after a skip.
    """
    count = update_count(state.opt_state)
    return state.step - state.skipped if count is None else count


def apply_update(
    state: TrainState,
    loss: jax.Array,
    grads: dict,
    optimizer: optax.GradientTransformation,
    schedule: LRSchedule,
    router_bias: dict | None = None,
) -> tuple[TrainState, dict]:
    """The state after one optimizer step on `grads` (and the new `router_bias`, if given),
    or the old state, step count and skip count advanced, when the loss or gradient is not
    finite; metrics grad_norm, learning_rate, finite and skipped. Every trainer's update."""
    step = schedule_step(state)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    router_bias = state.router_bias if router_bias is None else router_bias
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite step keeps the old state (the loop halts or counts it, per config).
    # Not optax.apply_if_finite: it checks only the gradients, gives up after a number of
    # consecutive failures, and cannot hold back the router bias, which is not optax's.
    keep = lambda new, old: optax.tree_utils.tree_where(finite, new, old)
    new_state = TrainState(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        router_bias=keep(router_bias, state.router_bias),
        rng=jax.random.fold_in(state.rng, state.step),
        skipped=state.skipped + (~finite).astype(jnp.int32),
    )
    metrics = {
        "grad_norm": grad_norm,
        "learning_rate": schedule(step),
        "finite": finite,
        "skipped": new_state.skipped,
    }
    return new_state, metrics


def make_train_step(
    cfg: ModelConfig,
    loss_cfg: LossConfig,
    optimizer: optax.GradientTransformation,
    schedule: LRSchedule,
    kd: KDConfig | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """A pure `train_step(state, batch) -> (state, metrics)` (jit it with donation).

    `schedule` must be the optimizer's (the logged learning rate is `schedule` at the
    optimizer's update count, the one it applies). With `kd`, batches carry the teacher's
    outputs and the loss distils (see `objective`).
    """

    def loss_fn(params, state: TrainState, batch: dict, step: jax.Array, *micro):
        variables = {"params": params, "router_bias": state.router_bias}
        counts, share = micro if micro else (None, 1.0)
        return objective(cfg, loss_cfg, variables, batch, step, counts, share, kd)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulated(state: TrainState, batch: dict, step: jax.Array):
        """grad_fn's output for the whole batch, summed over its micro-batches."""
        n, rows = loss_cfg.micro_batches, batch["inputs"].shape[0]
        if rows % n:
            raise ValueError(f"LossConfig.micro_batches = {n} does not divide the {rows} rows")
        counts = token_counts(cfg, batch, loss_cfg.mask_documents)
        # Row r goes to micro-batch r % n: when each device holds a multiple of n rows, each
        # micro-batch takes the same share of every device's rows and no row moves.
        split = lambda x: jnp.swapaxes(x.reshape(rows // n, n, *x.shape[1:]), 0, 1)
        micro_batches = jax.tree.map(split, batch)

        def one(micro_batch):
            (loss, (metrics, aux)), grads = grad_fn(
                state.params, state, micro_batch, step, counts, 1.0 / n
            )
            return loss, metrics, (aux.expert_counts, aux.mtp_expert_counts), grads

        def add(total, micro_batch):
            return jax.tree.map(jnp.add, total, one(micro_batch)), None

        first = jax.tree.map(lambda x: x[0], micro_batches)
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(one, first))
        (loss, metrics, (counts_L, mtp_counts_L), grads), _ = jax.lax.scan(
            add, zeros, micro_batches
        )
        aux = model.transformer.Aux(counts_L, None, None, mtp_counts_L, None, None)
        return (loss, (metrics, aux)), grads

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        step = schedule_step(state)
        if loss_cfg.micro_batches == 1:
            (loss, (metrics, aux)), grads = grad_fn(state.params, state, batch, step)
        else:
            (loss, (metrics, aux)), grads = accumulated(state, batch, step)
        bias_rate = loss_cfg.bias_rate_at(step)
        router_bias = update_router_bias(state.router_bias, aux, bias_rate)
        new_state, updated = apply_update(state, loss, grads, optimizer, schedule, router_bias)
        metrics |= updated | {
            "mtp_weight": loss_cfg.mtp_weight_at(step),
            "bias_update_rate": bias_rate,
        }
        if aux.expert_counts is not None:
            maxvio = max_violation(aux.expert_counts)
            metrics |= {
                "expert_load": aux.expert_counts,
                "maxvio": maxvio,
                "maxvio_mean": maxvio.mean(),
            }
        return new_state, metrics

    return train_step


def make_eval_step(
    cfg: ModelConfig, loss_cfg: LossConfig, kd: KDConfig | None = None
) -> Callable[[dict, dict], dict]:
    """`eval_step(variables, batch) -> {name: (sum, count)}` for averaging over held-out
    batches (variables: {'params', 'router_bias'}, e.g. `state.variables`); with `kd`, also
    the divergence to the teacher ("kd")."""

    def eval_step(variables: dict, batch: dict) -> dict:
        out = forward(cfg, variables, batch, loss_cfg.mask_documents)
        sums = token_losses(cfg, out, batch, loss_cfg.mask_documents)
        if kd is not None:
            _, mask = loss_targets(cfg, batch, loss_cfg.mask_documents)["ce"]
            sums["kd"] = (kd_sum(kd, out.logits, batch, mask), sums["ce"][1])
        return sums

    return eval_step
