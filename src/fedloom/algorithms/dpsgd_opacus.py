"""Local (example-level) differential privacy on a client: DP-SGD through Opacus.

With ``privacy.local_dp = true`` every client trains with DP-SGD (Abadi et al. 2016) as
implemented by Opacus: batches are Poisson-sampled (each example joins a step
independently with probability q), every example's gradient is clipped to L2 norm
``privacy.local_max_grad_norm`` (C), and Gaussian noise of standard deviation σ·C
(σ = ``privacy.local_noise_multiplier``) is added to the sum before the SGD step. The
update a client sends is then (ε, δ)-DP with respect to any one of *its own* examples
(one patient of a hospital), whatever the server does with it.

Choices:

* **A plain model per fit.** The flat-bound model of :class:`~fedloom.client.learner.Learner`
  owns ``p.grad`` as views into one buffer; Opacus' ``GradSampleModule`` and
  ``DPOptimizer`` manage ``p.grad`` and ``p.grad_sample`` themselves. So each fit trains a
  fresh copy of an unbound template model, loaded with
  :func:`fedloom.params.vector_to_module` and read back with
  :func:`fedloom.params.module_to_vector`.
* **Sampling rate.** Opacus' ``make_private`` sets q = 1 / (batches per epoch)
  = 1 / ⌈n / B⌉ (equal to B / n when B divides n) and an epoch is ⌈n / B⌉ steps. A
  straggler's shorter plan (fewer epochs or steps) is honoured; ε counts the steps taken.
* **Determinism.** By default the Poisson sampler draws from a generator keyed by
  (seed, LOCAL_DP_SAMPLING, round, client) and the noise from one keyed by (seed,
  LOCAL_DP_NOISE, round, client), so a client's update is bit-identical on replay
  (CPU), on any engine or worker. That also means the noise offers no privacy against
  anyone holding the run seed: simulation only.
* **Secure noise.** With ``privacy.secure_noise`` the noise comes from the OS CSPRNG
  through :class:`SecureNoiseDPOptimizer` (the sampler of
  :func:`fedloom.privacy.noise.secure_standard_normal`, shared with central DP) and
  the Poisson sampler's generator is seeded from ``os.urandom`` instead of the run
  seed. Opacus' own ``secure_mode`` would need torchcsprng, which is not installable
  here. Updates are then not reproducible, by design; ε is unchanged.
* **Accounting.** Opacus' RDP accountant; its ``history`` is a list of
  (σ, q, steps) triples, plain data, kept in the client's own state (the client state
  store, :mod:`fedloom.client_store`) so a client's ε composes over every round it
  trains in, whichever engine, worker or restarted process trains it. ε is
  reported at δ = ``privacy.local_delta``, or min(``privacy.delta``, 1 / (10 n)) for a
  client with n examples (δ well below 1/n, the usual rule).
* **FedProx.** The proximal gradient μ(w − w_t) does not depend on the data, so it is
  added to the noised gradient (post-processing) just before the optimizer step.
* **Unsupported layers** (BatchNorm, whose running statistics mix examples; ``nn.LSTM``,
  which Opacus replaces by ``DPLSTM`` with different parameter names) are refused when
  the client runtime is built, with one line naming the layer.
"""

from __future__ import annotations

import copy
import os
import warnings

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.module_utils import trainable_modules
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedloom.algorithms.base import ClientContext, ClientUpdate, full_global
from fedloom.algorithms.dpsgd import LEDGER_KEY, LocalDPSettings
from fedloom.algorithms.sgd import evaluate_global
from fedloom.client.learner import Learner
from fedloom.client_store import ClientState
from fedloom.config import ConfigError
from fedloom.messages import DELTA
from fedloom.params import module_to_vector, vector_to_module
from fedloom.privacy.noise import secure_standard_normal
from fedloom.seeding import torch_generator

# Purpose tags for the generators of local DP (see fedloom.seeding; kept apart from its
# small integers so they never collide with a tag added there).
LOCAL_DP_SAMPLING = 101
LOCAL_DP_NOISE = 102

#: One accountant entry: (noise multiplier, sample rate, steps), Opacus' RDP history format.
HistoryEntry = tuple[float, float, int]


def unsupported_layers(model: nn.Module) -> list[str]:
    """Why Opacus cannot train each offending layer of ``model``: ``"'name' (Type): reason"``.

    Runs Opacus' module validators (``ModuleValidator``) layer by layer, so each problem
    names its layer, plus the check of ``GradSampleModule`` that trainable layers hold no
    buffers (their statistics would mix examples outside the clipping).
    """
    problems: list[str] = []
    for name, sub in trainable_modules(model):
        reasons = [str(e) for e in ModuleValidator.VALIDATORS.get(type(sub), lambda m: [])(sub)]
        if not reasons and any(True for _ in sub.buffers(recurse=False)):
            reasons.append("it has buffers, which Opacus cannot make private")
        if reasons:
            label = name or "<model>"
            problems.append(f"'{label}' ({type(sub).__name__}): {reasons[0].strip()}")
    return problems


def check_opacus_compatible(model: nn.Module) -> None:
    """Raise a one-line :class:`ConfigError` naming every layer Opacus cannot train."""
    problems = unsupported_layers(model)
    if problems:
        joined = "; ".join(p.replace("\n", " ") for p in problems)
        raise ConfigError(
            f"privacy.local_dp: Opacus cannot train layer {joined}; replace it (e.g. "
            "BatchNorm by GroupNorm, nn.LSTM by opacus.layers.DPLSTM) or turn local DP off"
        )


def local_delta(settings: LocalDPSettings, num_examples: int) -> float:
    """The δ a client reports its ε at (see the module docstring)."""
    if settings.local_delta is not None:
        return settings.local_delta
    return min(settings.central_delta, 1.0 / (10 * max(num_examples, 1)))


def ledger_of(state: ClientState) -> list[HistoryEntry]:
    """The client's DP-SGD history from its persisted state (empty before it trains)."""
    return [(float(s), float(q), int(n)) for s, q, n in state.meta.get(LEDGER_KEY, [])]


class DPSGDClient:
    """DP-SGD client algorithm; the client's ledger lives in its state (``"local_dp"``)."""

    #: The run reports every client's local ε, so it is sent even under secure
    #: aggregation (it is the client's own privacy statement, not its data).
    server_metrics = frozenset({"local_epsilon"})

    def __init__(self, settings: LocalDPSettings, *, proximal_mu: float = 0.0) -> None:
        self.settings = settings
        self.proximal_mu = proximal_mu
        self._template: nn.Module | None = None

    def _fresh_model(self, learner: Learner) -> nn.Module:
        if self._template is None:
            self._template = learner.unbound_copy().train()
            check_opacus_compatible(self._template)
        return copy.deepcopy(self._template).train()

    def check(self, learner: Learner) -> None:
        """Refuse, before training, a model Opacus cannot train (one line naming the layer),
        or a learner on a GPU: this module's seeded sampling and noise are CPU generators,
        and a silent fallback to the CPU would misreport where the run trained."""
        if learner.device.type != "cpu":
            raise ConfigError(
                "client.algorithm = 'dp-sgd' trains on the CPU (its seeded noise and "
                "sampling generators are CPU ones); set engine.device = 'cpu'"
            )
        self._fresh_model(learner)

    def evaluate(self, ctx: ClientContext) -> dict[str, float]:
        return evaluate_global(ctx)

    def fit(self, ctx: ClientContext) -> ClientUpdate:
        """Train one client for one round from the global model; return Δ and metrics."""
        p, sgd, plan = self.settings, ctx.sgd, ctx.plan
        assert plan is not None
        client_id, rnd, train = ctx.client_id, ctx.round, ctx.data.train
        global_vector = full_global(ctx)
        model = self._fresh_model(ctx.learner)
        vector_to_module(global_vector, model)
        dataset = TensorDataset(torch.from_numpy(train.x), torch.from_numpy(train.y))
        secure = p.secure_noise
        loader = DataLoader(
            dataset,
            batch_size=ctx.work.batch_size,
            generator=_urandom_generator()
            if secure
            else torch_generator(ctx.seed, LOCAL_DP_SAMPLING, rnd, client_id),
        )
        optimizer = torch.optim.SGD(
            model.parameters(), lr=sgd.lr, momentum=sgd.momentum, weight_decay=sgd.weight_decay
        )
        with warnings.catch_warnings():
            # "Secure RNG turned off": Opacus' secure mode needs torchcsprng; the seeded
            # or the CSPRNG noise of this module replaces it (see the module docstring).
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant="rdp", secure_mode=False)
            engine.accountant.history = ledger_of(ctx.state)
            module, dp_opt, dp_loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=p.noise_multiplier,
                max_grad_norm=p.max_grad_norm,
                poisson_sampling=True,
                noise_generator=None
                if secure
                else torch_generator(ctx.seed, LOCAL_DP_NOISE, rnd, client_id),
            )
        assert isinstance(module, GradSampleModule) and isinstance(dp_opt, DPOptimizer)
        if secure:
            dp_opt = SecureNoiseDPOptimizer.replacing(dp_opt)
        if self.proximal_mu:
            _add_proximal_term(dp_opt, list(model.parameters()), self.proximal_mu)

        loss_fn = ctx.learner.loss
        loss_sum = torch.zeros((), dtype=torch.float64)
        nonempty = steps = 0
        with warnings.catch_warnings():
            # Opacus' hooks on the first layer, whose input needs no gradient: harmless.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for xb, yb in plan.batches(lambda: dp_loader):
                dp_opt.zero_grad(set_to_none=True)
                loss = loss_fn(module(xb), yb)
                loss.backward()
                dp_opt.step()
                if len(yb):
                    loss_sum += loss.detach()
                    nonempty += 1
                steps += 1
        module._close()  # remove Opacus' hooks; the plain copy is discarded anyway

        history = [(float(s), float(q), int(n)) for s, q, n in engine.accountant.history]
        ctx.state.meta[LEDGER_KEY] = [[s, q, float(n)] for s, q, n in history]
        delta_at = local_delta(p, len(train))
        with torch.no_grad():
            delta = (module_to_vector(model) - global_vector).astype(np.float32)
        metrics = {
            "train_loss": float(loss_sum) / max(nonempty, 1),
            "steps": float(steps),
            "local_epsilon": epsilon_of(history, delta_at),
            "local_delta": delta_at,
            "local_sample_rate": float(dp_loader.sample_rate),
        }
        return ClientUpdate({DELTA: delta}, metrics)


class SecureNoiseDPOptimizer(DPOptimizer):
    """Opacus' ``DPOptimizer`` drawing its Gaussian noise from the OS CSPRNG.

    DP-SGD (Abadi et al. 2016, Algorithm 1) adds N(0, σ²C²I) to the sum of the clipped
    per-example gradients at every step; its guarantee assumes nobody can predict that
    noise. Opacus draws it in :meth:`DPOptimizer.add_noise` from a torch generator, and
    its ``secure_mode`` (a CSPRNG torch generator) needs torchcsprng. This subclass
    overrides only ``add_noise``, the one step that draws randomness, with
    :func:`fedloom.privacy.noise.secure_standard_normal` (``os.urandom``, Box–Muller, four
    normals summed and halved as Opacus' secure mode does, Holohan & Braghin 2021): same
    standard deviation σ·C, same shapes. Clipping, scaling, hooks and accounting stay
    Opacus' own, so the accountant's ε does not depend on the generator.
    """

    @classmethod
    def replacing(cls, dp_opt: DPOptimizer) -> SecureNoiseDPOptimizer:
        """``dp_opt`` (as ``make_private`` built it) with CSPRNG noise: same wrapped
        optimizer, σ, C, expected batch size, loss reduction and step (accountant) hook."""
        out = cls(
            dp_opt.original_optimizer,
            noise_multiplier=dp_opt.noise_multiplier,
            max_grad_norm=dp_opt.max_grad_norm,
            expected_batch_size=dp_opt.expected_batch_size,
            loss_reduction=dp_opt.loss_reduction,
            secure_mode=True,
        )
        if dp_opt.step_hook is not None:
            out.attach_step_hook(dp_opt.step_hook)
        return out

    def add_noise(self) -> None:
        """``p.grad = p.summed_grad + N(0, (σC)²)`` per parameter, one CSPRNG draw per step."""
        std = self.noise_multiplier * self.max_grad_norm
        sums = [p.summed_grad for p in self.params]
        for summed in sums:
            _check_processed_flag(summed)
        sizes = [summed.numel() for summed in sums]
        noise = torch.from_numpy(secure_standard_normal(sum(sizes)) * std)
        for p, summed, chunk in zip(self.params, sums, noise.split(sizes), strict=True):
            p.grad = (summed + chunk.view_as(summed).to(summed.dtype)).view_as(p)
            _mark_as_processed(summed)


def _urandom_generator() -> torch.Generator:
    """A torch generator seeded with 64 bits from ``os.urandom`` (secure-noise sampling).

    With ``secure_noise`` the Poisson batches must not be predictable from the run seed:
    privacy amplification by sampling assumes the adversary does not know who was in a
    batch. The sampler needs a torch generator; a CSPRNG one needs torchcsprng, so this is
    torch's own generator with an unpredictable seed (the noise itself is CSPRNG output).
    """
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return generator


def epsilon_of(history: list[HistoryEntry], delta: float) -> float:
    """ε of a DP-SGD history at ``delta`` from Opacus' RDP accountant."""
    accountant = RDPAccountant()
    accountant.history = list(history)
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": ε is then an upper bound, just looser.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(accountant.get_epsilon(delta))


def _add_proximal_term(optimizer: DPOptimizer, params: list[torch.Tensor], mu: float) -> None:
    """Add μ(w − w_t) to the noised gradient before each step (FedProx, Li et al. 2020).

    w_t is the value of ``params`` now, before training. Opacus' step hook runs after
    clipping, noising and scaling and before the optimizer's own step; the accountant's
    hook is kept and called afterwards.
    """
    w0 = [w.detach().clone() for w in params]
    accountant_hook = optimizer.step_hook

    def hook(opt: DPOptimizer) -> None:
        with torch.no_grad():
            for w, w_t in zip(params, w0, strict=True):
                if w.grad is not None:
                    w.grad.add_(w - w_t, alpha=mu)
        if accountant_hook is not None:
            accountant_hook(opt)

    optimizer.step_hook = hook
