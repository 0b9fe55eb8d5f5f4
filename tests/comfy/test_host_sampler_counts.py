"""The evaluation count Apply DPCache predicts before sampling, for every ComfyUI sampler, against the
model evaluations the real sampler makes (counted with a PREDICT_NOISE wrapper on the tiny FLUX)."""
from __future__ import annotations

import pytest

from comfy_host import BlockCounter, build_model, sample

pytestmark = pytest.mark.comfy


def counted(model):
    """A clone of ``model`` that counts sampler evaluations (PREDICT_NOISE calls, cond and uncond as one)."""
    from comfy.patcher_extension import WrappersMP

    calls = []
    m = model.clone()

    def count(executor, *args, **kwargs):
        calls.append(1)
        return executor(*args, **kwargs)

    m.add_wrapper_with_key(WrappersMP.PREDICT_NOISE, "count_evaluations", count)
    return m, calls


def sampler_sigmas(model, sampler, scheduler, steps):
    """The sigmas KSampler hands the sampler (penultimate one dropped for dpm_2, uni_pc, ...)."""
    import comfy.samplers
    return comfy.samplers.KSampler(model, steps, "cpu", sampler, scheduler).sigmas


def test_every_sampler_count_before_sampling_matches_the_real_run(host):
    import comfy.samplers
    counts = host["sampler_counts"]
    model = build_model("flux")
    rectified = counts.is_rectified_flow(model)
    assert rectified  # FLUX samples as a flow (CONST)
    checked, variable = [], []
    for name in comfy.samplers.SAMPLER_NAMES:
        for steps, scheduler in ((5, "simple"), (8, "karras")):
            sigmas = sampler_sigmas(model, name, scheduler, steps)
            expected = counts.expected_evaluations(comfy.samplers.sampler_object(name), sigmas, rectified)
            m, calls = counted(model)
            sample(m, "flux", steps=steps, cfg=1.0, sampler=name, scheduler=scheduler)
            if expected is None:
                variable.append(f"{name} {steps}:{len(calls)}")
            else:
                assert expected == len(calls), f"{name}, {steps} steps {scheduler}: predicted {expected}, made {len(calls)}"
                checked.append(name)
    names = sorted(set(checked))
    print(f"\n[host] evaluation count checked before sampling for {len(names)} samplers: {', '.join(names)}; "
          f"known only while sampling: {', '.join(variable)}")
    assert {"uni_pc", "uni_pc_bh2", "heun", "dpmpp_2s_ancestral", "dpmpp_sde", "dpm_fast", "heunpp2"} <= set(names)
    assert {v.split()[0] for v in variable} == {"dpm_adaptive"}
    # ddim runs as euler; the list in docs/errors-and-samplers.md, less the samplers this ComfyUI does not have
    assert set(names) - {"ddim"} == set(counts.checked_samplers()) & set(comfy.samplers.SAMPLER_NAMES)


@pytest.mark.parametrize("sampler, steps", [("uni_pc", 10), ("uni_pc_bh2", 10), ("dpmpp_2s_ancestral", 6)])
def test_apply_refuses_a_wrong_t_before_the_first_evaluation(host, sampler, steps):
    """The Wan workflows' uni_pc (and a 2-evaluation sampler): both numbers, nothing computed."""
    import nodes
    core = host["core"]
    model = build_model("wan_t2v")
    sigmas = sampler_sigmas(model, sampler, "simple", steps)
    import comfy.samplers
    real = host["sampler_counts"].expected_evaluations(comfy.samplers.sampler_object(sampler), sigmas, True)
    for wrong in (real - 2, real + 3):
        sched = core.Schedule(tuple(core.uniform_key_steps(wrong, 4, 2)), wrong)
        (fast,) = nodes.NODE_CLASS_MAPPINGS["DPCacheApply"]().apply(model, sched)["result"]
        with BlockCounter(model) as c, pytest.raises(ValueError, match=f"\\({sampler}\\) makes {real} model evaluations.*T={wrong}") as err:
            sample(fast, "wan_t2v", steps=steps, cfg=3.0, sampler=sampler)
        assert c.model_calls == 0, f"{sampler}: {c.model_calls} model calls before the error"
        assert "heun" not in str(err.value)
        assert type(err.value).__module__ == "dpcache"  # ComfyUI's dialog shows "dpcache.ScheduleMismatchError"
    sched = core.Schedule(tuple(core.uniform_key_steps(real, 4, 2)), real)
    (fast,) = nodes.NODE_CLASS_MAPPINGS["DPCacheApply"]().apply(model, sched)["result"]
    with BlockCounter(model) as c:
        sample(fast, "wan_t2v", steps=steps, cfg=3.0, sampler=sampler)
    print(f"\n[host] wan {sampler} {steps} steps = {real} evaluations: wrong T refused before sampling; "
          f"K=4 runs the blocks at {set(c.counts.values())} evaluations")
    assert set(c.counts.values()) == {4}
