"""How many model evaluations a ComfyUI sampler makes for given sigmas, known before sampling.

Read from ComfyUI v0.3.64 and 0.33 (comfy/k_diffusion/sampling.py, comfy/extra_samplers/uni_pc.py,
comfy/samplers.py) and checked against it by counting model calls (tests/comfy). ``sigmas`` are
the ones the sampler receives (KSampler has already dropped the penultimate sigma for dpm_2,
dpm_2_ancestral, uni_pc and uni_pc_bh2). No ComfyUI import: the CPU tests use it too.
"""
from __future__ import annotations

# One model evaluation per step, whatever the sigmas: len(sigmas) - 1.
ONE_PER_STEP = {
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "lms", "dpm_fast",
    "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v",
    "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde",
    "uni_pc", "uni_pc_bh2",  # the final step to sigma 0 makes no evaluation; ddim runs as euler
}
# A second evaluation in every step whose next sigma is not 0 (a third one for seeds_3).
EXTRA_UNLESS_LAST = {"heun": 1, "dpm_2": 1, "dpmpp_sde": 1, "dpmpp_sde_gpu": 1, "seeds_2": 1, "seeds_3": 2,
                     "exp_heun_2_x0": 1, "exp_heun_2_x0_sde": 1}  # newer ComfyUI: seeds_2 with other options
# A second evaluation in every step whose ancestral "sigma_down" is not 0 (depends on eta).
ANCESTRAL_SECOND_ORDER = {"dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp"}
# Step sizes chosen during sampling: the count is only known afterwards.
VARIABLE = {"dpm_adaptive"}
# ComfyUI's sampler functions whose name is not "sample_" + the sampler's name.
FUNCTION_NAMES = {"unipc": "uni_pc", "unipc_bh2": "uni_pc_bh2",
                  "dpm_fast_function": "dpm_fast", "dpm_adaptive_function": "dpm_adaptive"}


def sampler_name(sampler) -> str | None:
    """The ComfyUI sampler name of a KSAMPLER (from its sampler function), or None."""
    fn = getattr(sampler, "sampler_function", None)
    name = getattr(fn, "__name__", None)
    if not name:
        return None
    name = name[len("sample_"):] if name.startswith("sample_") else name
    return FUNCTION_NAMES.get(name, name)


def checked_samplers() -> list[str]:
    """The samplers whose evaluation count is checked before the first evaluation."""
    return sorted(ONE_PER_STEP | set(EXTRA_UNLESS_LAST) | ANCESTRAL_SECOND_ORDER | {"heunpp2", "sa_solver", "sa_solver_pece"})


def ancestral_sigma_down(sigma, sigma_next, eta: float, rectified_flow: bool):
    """sigma_down of an ancestral step, as ComfyUI computes it (RF variant for flow models)."""
    if rectified_flow:
        return sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    if not eta:
        return sigma_next
    sigma_up = min(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
    return (sigma_next ** 2 - sigma_up ** 2) ** 0.5


def expected_evaluations(sampler, sigmas, rectified_flow: bool = True) -> int | None:
    """Model evaluations the run will make, when its sampler and sigmas fix them; else None.

    ``rectified_flow``: the model samples as a flow (ComfyUI's CONST model sampling: FLUX, Wan),
    which switches dpm_2_ancestral and dpmpp_2s_ancestral to their RF variants.
    """
    name = sampler_name(sampler)
    options = getattr(sampler, "extra_options", None) or {}
    steps = int(sigmas.shape[-1]) - 1
    if steps < 1 or name is None or name in VARIABLE:
        return None
    nonzero_next = [bool(s != 0) for s in sigmas[1:]]
    if name in ONE_PER_STEP:
        return steps
    if name in EXTRA_UNLESS_LAST:
        return steps + EXTRA_UNLESS_LAST[name] * sum(nonzero_next)
    if name in ANCESTRAL_SECOND_ORDER:
        eta = options.get("eta", 1.0)
        if rectified_flow and name == "dpmpp_2s_ancestral":  # its RF variant tests the next sigma
            return steps + sum(nonzero_next)
        rf = rectified_flow and name == "dpm_2_ancestral"
        return steps + sum(bool(ancestral_sigma_down(sigmas[i], sigmas[i + 1], eta, rf) != 0) for i in range(steps))
    if name == "heunpp2":  # Euler into the last sigma, Heun one step before it, Heun++ (3) elsewhere
        end = sigmas[-1]
        return sum(1 if sigmas[i + 1] == end else 2 if sigmas[i + 2] == end else 3 for i in range(steps))
    if name in ("sa_solver", "sa_solver_pece"):  # PECE re-evaluates every corrected step but the first
        pece = options.get("use_pece", name == "sa_solver_pece") and options.get("corrector_order", 4) > 0
        return steps + (steps - 1 if pece else 0)
    return None


def is_rectified_flow(model_patcher) -> bool:
    """Whether the model samples as a flow (ComfyUI's CONST model sampling); True when unknown."""
    try:
        sampling = model_patcher.get_model_object("model_sampling")
    except Exception:  # the CPU tests' fake models have none
        return True
    return any(cls.__name__ == "CONST" for cls in type(sampling).__mro__)
