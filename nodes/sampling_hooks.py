"""DPCache's hooks inside ComfyUI's sampling (DESIGN §3), and what they read of a sampling run.

Three pieces, registered on a clone of the MODEL by ``install``:

- an OUTER_SAMPLE wrapper (``sample_with_run``) creates the per-run state before sampling and frees it
  in ``finally`` (nothing survives a run, finished or interrupted);
- a PREDICT_NOISE wrapper advances the evaluation counter once per sampler evaluation, so cond and
  uncond (batched in one call or split into several) always agree on key-or-skip;
- an APPLY_MODEL wrapper makes each model call's decision before its blocks run (``block_patches``).

No ComfyUI import at module level: the CPU tests drive these functions with small fakes.
"""
from __future__ import annotations

import logging

import torch

try:  # inside ComfyUI the pack is a package; in the CPU tests the repo root is on sys.path
    from ..dpcache_core.replan import RunShape
    from ..dpcache_core.transfer import positions_from_sigmas, spread_ties
except ImportError:  # pragma: no cover - depends on how the pack is imported
    from dpcache_core.replan import RunShape
    from dpcache_core.transfer import positions_from_sigmas, spread_ties

from .block_patches import CALL_KEY, PATCH_KEY, RUN_KEY, BlockPatches, ModelInfo, block_patch_owners
from .run_state import RunState
from .sampler_counts import expected_evaluations, is_rectified_flow, sampler_name

log = logging.getLogger("dpcache")


def evaluation_sigmas(sampler, sigmas, rectified_flow: bool = True) -> list[float] | None:
    """The sigma of every model evaluation of the run, when known before sampling, else None."""
    count = expected_evaluations(sampler, sigmas, rectified_flow)
    if count is None:
        return None
    s = [float(x) for x in sigmas.reshape(-1)]
    steps = len(s) - 1
    if count == steps:
        return s[:-1]
    name = sampler_name(sampler)
    if name == "heun":  # the corrector evaluates at the next sigma (none on the last step to 0)
        return [x for i in range(steps) for x in ([s[i], s[i + 1]] if s[i + 1] != 0 else [s[i]])]
    if name == "dpm_2":  # the midpoint evaluates at the geometric mean of the two sigmas
        return [x for i in range(steps) for x in ([s[i], (s[i] * s[i + 1]) ** 0.5] if s[i + 1] != 0 else [s[i]])]
    return None


def sigma_table(guider):
    """The model's ascending sigma table (``model_sampling.sigmas``), or None."""
    try:
        table = guider.model_patcher.get_model_object("model_sampling").sigmas
        return table.detach().float().cpu().numpy()
    except Exception:
        return None


def run_shape(guider, sampler, sigmas) -> RunShape | None:
    """Evaluation count and normalised positions of the run (None when the count is not known up front).

    Positions come from each evaluation's sigma through the model's sigma table; a run whose
    first sigma is below sigma_max or whose last is above 0 samples a window of the trajectory.
    Without a sigma table, or a sampler whose evaluation sigmas are unknown, the positions are
    evenly spaced over the window.
    """
    rectified_flow = is_rectified_flow(guider.model_patcher)
    count = expected_evaluations(sampler, sigmas, rectified_flow)
    if count is None:
        return None
    table = sigma_table(guider)
    if table is None:
        return RunShape(count)
    ends = positions_from_sigmas([float(sigmas.reshape(-1)[0]), float(sigmas.reshape(-1)[-1])], table)
    evals = evaluation_sigmas(sampler, sigmas, rectified_flow)
    if evals is None:
        start, end = float(ends[0]), float(ends[1])
        positions = [start + (end - start) * k / count for k in range(count)]
    else:
        positions = spread_ties(positions_from_sigmas(evals, table))
    return RunShape(count, tuple(float(p) for p in positions), float(ends[1]))


def refuse_context_windows(guider, node: str) -> None:
    """Refuse a run with context windows: each window is a separate model call on another part of the latent."""
    if guider.model_options.get("context_handler") is not None:
        raise ValueError(
            f"{node} does not work with context windows (each window is a separate model call "
            f"on another part of the latent); remove the context-window node or {node}"
        )


def uses_controlnet(guider) -> bool:
    conds = getattr(guider, "conds", None) or {}
    return any(isinstance(c, dict) and c.get("control") is not None for cs in conds.values() for c in (cs or []))


def guess_scheduler(guider, sigmas) -> str | None:
    """The ComfyUI scheduler that makes exactly these sigmas, when one does (metadata only)."""
    try:
        import comfy.samplers

        ms = guider.model_patcher.get_model_object("model_sampling")
        steps = int(sigmas.shape[-1]) - 1
        want = sigmas.detach().float().cpu()
        for name in comfy.samplers.SCHEDULER_NAMES:
            got = comfy.samplers.calculate_sigmas(ms, name, steps).float().cpu()
            if got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-6):
                return name
    except Exception:
        pass
    return None


def resolution_of(latent) -> str:
    """"WxH" in pixels (latent x 8), plus "xF" frames for video latents [B, C, T, H, W]."""
    shape = list(latent.shape)
    h, w = shape[-2] * 8, shape[-1] * 8
    if len(shape) == 5:
        return f"{w}x{h}x{(shape[2] - 1) * 4 + 1}"
    return f"{w}x{h}"


def options_with_run(options: dict, run) -> dict:
    """A copy of the guider's model_options carrying ``run`` (the original is restored afterwards)."""
    new = dict(options)
    new["transformer_options"] = dict(options.get("transformer_options", {}))
    new["transformer_options"][RUN_KEY] = run
    return new


def run_from(executor, args) -> RunState | None:
    options = args[2] if len(args) > 2 and isinstance(args[2], dict) else executor.class_obj.model_options
    return options.get("transformer_options", {}).get(RUN_KEY)


def make_apply_model_wrapper(patches: BlockPatches):
    """The APPLY_MODEL wrapper: once per model call, before any block, make the call's state (the
    ``Call`` its blocks read from ``transformer_options``) with the run's decision, and put our
    blocks back around any replacement another node made for this call; after it, feed the caches."""

    def dpcache_apply_model(executor, *args, **kwargs):
        named = "transformer_options" in kwargs
        to = kwargs["transformer_options"] if named else (args[5] if len(args) > 5 else None)
        run = to.get(RUN_KEY) if isinstance(to, dict) else None
        if run is None:
            return executor(*args, **kwargs)
        dit, variant = patches.for_call(to)
        to = dict(to)
        if variant:
            to["patches_replace"] = dict(to.get("patches_replace", {}), dit=dit)
        control = kwargs.get("control", args[4] if len(args) > 4 else None)
        x = args[0]
        call = run.open_call(to, x, variant, block_patch_owners(to), control is not None,
                             (patches.last, dit.get(patches.last)))
        to[CALL_KEY] = call
        if named:
            kwargs["transformer_options"] = to
        else:
            args = (*args[:5], to, *args[6:])
        out = executor(*args, **kwargs)
        run.close_call(call)
        return out

    return dpcache_apply_model


def predict_noise_wrapper(executor, *args, **kwargs):
    """Once per sampler evaluation: advance the run's counter (key or skip for every stream)."""
    run = run_from(executor, args)
    if run is not None:
        sigma = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else None
        run.start_evaluation(sigma)
    return executor(*args, **kwargs)


def is_cancel(exc: BaseException) -> bool:
    """ComfyUI's Cancel (``InterruptProcessingException``): the user stops the prompt, not a failure."""
    return type(exc).__name__ == "InterruptProcessingException"


def failure_text(exc: BaseException) -> str:
    """What failed, for the log and the node: the error's class and message (a file error names its path)."""
    return f"{type(exc).__name__}: {exc}"


def sample_with_run(executor, args, kwargs, start, finish, failed):
    """Run the sampler with a fresh run state from ``start(guider, args)``; ``finish(run, ok)`` always.

    Once the sampler has returned its output nothing here raises: an error in the end-of-run work
    (``finish(run, True)``: writing a PACT, building its sample, the end-of-run checks) goes to
    ``failed(run, error)``, the hook's one log line and node text, and the output is returned.
    Only ComfyUI's Cancel, pressed during that work, still stops the prompt.
    """
    guider = executor.class_obj
    original = guider.model_options
    run = start(guider, args)
    try:
        guider.model_options = options_with_run(original, run)
        out = executor(*args, **kwargs)
    except BaseException:
        guider.model_options = original
        try:
            finish(run, False)
        finally:
            run.close()
        raise
    guider.model_options = original
    try:
        finish(run, True)
    except Exception as exc:
        if is_cancel(exc):
            raise
        try:
            failed(run, exc)
        except Exception as again:  # the report itself failed: the log still says what happened
            log.error("DPCache: after the sampler returned: %s (and reporting it failed: %s); the output is returned",
                      failure_text(exc), failure_text(again))
    finally:
        try:
            run.close()
        except Exception as exc:  # freeing the run's state: never worth the output
            log.error("DPCache: freeing the run's state failed after the sampler returned: %s; the output is returned",
                      failure_text(exc))
    return out


def install(model, info: ModelInfo, hook, label: str) -> None:
    """Register ``hook`` (ApplyHook or CalibrateHook) on ``model``, a clone."""
    try:
        from comfy.patcher_extension import WrappersMP

        outer, predict, apply_model = WrappersMP.OUTER_SAMPLE, WrappersMP.PREDICT_NOISE, WrappersMP.APPLY_MODEL
    except ImportError:  # CPU tests (the same names ComfyUI uses)
        outer, predict, apply_model = "outer_sample", "predict_noise", "apply_model"
    patches = BlockPatches(info)
    patches.install(model)
    model.model_options["transformer_options"][PATCH_KEY] = label
    model.add_wrapper_with_key(outer, PATCH_KEY, hook.outer_sample)
    model.add_wrapper_with_key(predict, PATCH_KEY, predict_noise_wrapper)
    model.add_wrapper_with_key(apply_model, PATCH_KEY, make_apply_model_wrapper(patches))
