// Builds workflows/*.json with the real ComfyUI frontend, so the files have exactly the
// shape the frontend saves (UI format). Developer tool, not a test:
//   python tests/browser/comfy_server.py &            # ComfyUI with this pack, on 127.0.0.1:8199
//   NODE_PATH=<dir>/node_modules node tests/browser/make_workflows.mjs [http://127.0.0.1:8199]
import { writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import { launch, openComfy } from "./browser_lib.mjs";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const url = process.argv[2] ?? "http://127.0.0.1:8199";

const NOTE_AUTO = `AUTOMATIC MODE (this workflow): Apply DPCache has no schedule connected. The first run at a new setting (this model with its LoRAs, sampler, scheduler, step count, cfg batching) computes every evaluation, so it is the normal run with no speed-up, and saves a PACT in models/dpcache/auto_<family>_<sampler>_<scheduler>_<steps>_<hash>.safetensors; the node says "calibrating this setting (run 1)". Every later run at that setting is planned from that file by dynamic programming at target_speedup (3.85 = K 13 of 50, scaled to the run's steps). Another step count, sampler or scheduler of the same model is planned from the nearest file (transferred; the node says so) until you calibrate it; another model or LoRA set calibrates again. refine_every N adds a calibration run every N-th run (0 = off). After each run Apply DPCache shows the keys that ran, how many of how many evaluations were computed and the speed-up.`;

const NOTE_COMMON = `DPCACHE SCHEDULE SETTINGS (when you connect a DPCache Schedule to Apply DPCache's schedule input instead)
- key_steps (K): how many of the T model evaluations are computed in full. The others skip every transformer block and predict its output with a Taylor expansion. Ideal speed-up = T / K (K=13 of 50: 3.85x, K=9: 5.56x). Smaller K = faster, less faithful.
- total_evaluations (T): the model evaluations (uniform) and (manual) plan for. euler, uni_pc and other one-step samplers: T = steps; heun makes about 2x steps. A PACT file fixes T itself. A run with another count (other steps, sampler, or a KSamplerAdvanced slice) is re-planned for it when sampling starts, from the PACT transferred to that count; (manual) stops with a clear error instead.
- budget: how K follows such a run. same speed-up scales K with the count (K=13 of 50 -> 7 of 28), target speed-up plans count / target_speedup, fixed K keeps K.
- first_full_steps / last_full_steps: evaluations always computed at the start / end (the image changes fastest at the start).
- pact: "(uniform)" spaces the key steps evenly and "(manual)" takes manual_key_steps (e.g. "0, 1, 2, 5, 9-11"); both work without calibrating. A calibrated PACT lets DPCache plan the key steps globally (dynamic programming over the path-aware cost tensor), which is what gives the paper its quality at high speed-ups.

EXPECTED SPEED-UP: about T/K minus overhead. The paper reports 3.54x at K=13 and 4.87x at K=9 on FLUX.1-dev, 50 steps (ideal 3.85x / 5.56x). The one-line report in the console after each run gives the measured numbers. To compare with full compute, select "Apply DPCache" and press Ctrl+B (bypass).
DPCache Schedule's picture output shows its schedule: the PACT heatmap with the chosen path, or a timeline of key and predicted evaluations.`;

const FLUX_PACT = "flux1_dev_official_T50.safetensors";
const WAN_PACT = "wan21_i2v_14b_official_T50.safetensors";

const FLUX_T2I = {
  file: "flux_t2i_dpcache.json",
  nodes: {
    unet: ["UNETLoader", [20, 80], { unet_name: "flux1-dev.safetensors", weight_dtype: "default" }],
    clip: ["DualCLIPLoader", [20, 230], { clip_name1: "clip_l.safetensors", clip_name2: "t5xxl_fp16.safetensors", type: "flux", device: "default" }],
    vae: ["VAELoader", [20, 420], { vae_name: "ae.safetensors" }],
    apply: ["DPCacheApply", [400, 80], { target_speedup: 3.85, refine_every: 0 }, { size: [290, 110] }],
    pos: ["CLIPTextEncode", [400, 510], { text: "a red fox sitting in fresh snow at sunrise, soft golden light, detailed fur, shallow depth of field" }, { title: "CLIP Text Encode (Prompt)" }],
    guid: ["FluxGuidance", [400, 760], { guidance: 3.5 }],
    neg: ["ConditioningZeroOut", [400, 868], {}],
    latent: ["EmptySD3LatentImage", [400, 944], { width: 1024, height: 1024, batch_size: 1 }],
    ks: ["KSampler", [800, 80], { seed: 42, control_after_generate: "fixed", steps: 50, cfg: 1.0, sampler_name: "euler", scheduler: "simple", denoise: 1.0 }],
    dec: ["VAEDecode", [800, 560], {}],
    save: ["SaveImage", [1120, 80], { filename_prefix: "DPCache/flux" }, { size: [400, 360] }],
    note: ["Note", [1120, 480], {}, { size: [460, 560], text:
      "FLUX.1-dev text-to-image with DPCache\n\n" +
      "Models: flux1-dev.safetensors in models/diffusion_models, clip_l + t5xxl in models/text_encoders, ae.safetensors in models/vae.\n" +
      "Sampler: euler, 50 steps, cfg 1 (FLUX guidance 3.5) = 50 model evaluations, so total_evaluations = 50.\n\n" +
      NOTE_AUTO + "\n\n" +
      "SHIPPED PACT: " + FLUX_PACT + " ships with the pack: the DPCache authors' calibration of FLUX.1-dev (diffusers, 50 Euler steps, guidance 3.5; Apache-2.0, see NOTICE); ComfyUI's euler / simple at 1024x1024 makes the same sigmas. To use it from the first run, add DPCache Schedule, pick it in \"pact\" and connect its schedule output to Apply DPCache.\n\n" +
      "CALIBRATE YOUR OWN to share a PACT (several prompts averaged, a fine-tuned model or a LoRA): the flux_calibrate workflow.\n\n" + NOTE_COMMON }],
  },
  links: [
    ["unet", 0, "apply", "model"],
    ["apply", 0, "ks", "model"], ["clip", 0, "pos", "clip"], ["pos", 0, "guid", "conditioning"],
    ["guid", 0, "ks", "positive"], ["pos", 0, "neg", "conditioning"], ["neg", 0, "ks", "negative"],
    ["latent", 0, "ks", "latent_image"], ["ks", 0, "dec", "samples"], ["vae", 0, "dec", "vae"], ["dec", 0, "save", "images"],
  ],
};

const FLUX_CAL = {
  file: "flux_calibrate.json",
  nodes: {
    unet: ["UNETLoader", [20, 80], { unet_name: "flux1-dev.safetensors", weight_dtype: "default" }],
    clip: ["DualCLIPLoader", [20, 230], { clip_name1: "clip_l.safetensors", clip_name2: "t5xxl_fp16.safetensors", type: "flux", device: "default" }],
    vae: ["VAELoader", [20, 420], { vae_name: "ae.safetensors" }],
    cal: ["DPCacheCalibrate", [400, 80], { pact_name: "flux_dev_euler_50", order: 1, reset: false, sample_size: 65536, check_runs: 8 }],
    pos: ["CLIPTextEncode", [400, 260], { text: "a lighthouse on a rocky coast in a storm, dramatic clouds, photograph" }, { title: "CLIP Text Encode (Prompt)" }],
    guid: ["FluxGuidance", [400, 500], { guidance: 3.5 }],
    neg: ["ConditioningZeroOut", [400, 610], {}],
    latent: ["EmptySD3LatentImage", [400, 700], { width: 1024, height: 1024, batch_size: 1 }],
    ks: ["KSampler", [800, 80], { seed: 1, control_after_generate: "randomize", steps: 50, cfg: 1.0, sampler_name: "euler", scheduler: "simple", denoise: 1.0 }],
    dec: ["VAEDecode", [800, 560], {}],
    prev: ["PreviewImage", [1120, 80], {}, { size: [400, 300] }],
    note: ["Note", [1120, 420], {}, { size: [460, 520], text:
      "FLUX.1-dev calibration for DPCache\n\n" +
      "DPCache Calibrate records the model's features at every evaluation while this runs at full speed; each finished run adds one sample to models/dpcache/flux_dev_euler_50.safetensors.\n\n" +
      "WHEN: the pack ships the DPCache authors' PACT for FLUX.1-dev at euler / simple / 50 steps / 1024x1024 (" + FLUX_PACT + "). Calibrate your own for a fine-tuned model or LoRA, another sampler, scheduler, shift, resolution or step count: it then measures exactly the trajectories you run.\n\n" +
      "HOW TO CALIBRATE\n" +
      "1. Keep the sampler, scheduler, step count and resolution you want to accelerate (here euler / simple / 50 steps / 1024x1024).\n" +
      "2. Queue 5-10 runs: set the Run button's batch count to 8 (seed is on randomize), and change the prompt between queues if you like; varied prompts give a more general PACT.\n" +
      "3. Press R to refresh. In the flux_t2i_dpcache workflow add DPCache Schedule, pick flux_dev_euler_50.safetensors in its 'pact' list and connect its schedule output to Apply DPCache (with nothing connected, Apply DPCache calibrates by itself on its first run instead: its automatic mode).\n\n" +
      "- pact_name: the file in models/dpcache/; runs with the same name accumulate (samples are averaged).\n" +
      "- order: Taylor order of the predictor the PACT is built for. 1 (default) lets the DP plan exactly what runs later and won in our benchmarks; 2 is the paper's choice.\n" +
      "- reset: start the file afresh on the next finished run.\n" +
      "- sample_size: how many cache-point elements (a fixed random pick) estimate the PACT; 65536 keeps about 13 MB per stream at any resolution, 0 records every element (exact, gigabytes at 1024x1024).\n" +
      "- check_runs: after each of the file's first 8 runs (default), the same prompt is sampled again with the cache by each forecaster (Taylor 1, Taylor 2, spectral) at 5 speed-ups; DPCache Schedule's forecaster auto then takes the one measured best. About 7 more runs' time after each of those runs; 0 turns it off.\n" +
      "Calibration itself has no speed-up; it costs one normal run per sample." }],
  },
  links: [
    ["unet", 0, "cal", "model"], ["cal", 0, "ks", "model"], ["clip", 0, "pos", "clip"], ["pos", 0, "guid", "conditioning"],
    ["guid", 0, "ks", "positive"], ["pos", 0, "neg", "conditioning"], ["neg", 0, "ks", "negative"],
    ["latent", 0, "ks", "latent_image"], ["ks", 0, "dec", "samples"], ["vae", 0, "dec", "vae"], ["dec", 0, "prev", "images"],
  ],
};

const WAN_NEG = "static, blurry, low quality, worst quality, jpeg artifacts, deformed, extra fingers, watermark, subtitles";

const WAN_T2V = {
  file: "wan21_t2v_dpcache.json",
  nodes: {
    unet: ["UNETLoader", [20, 80], { unet_name: "wan2.1_t2v_1.3B_fp16.safetensors", weight_dtype: "default" }],
    clip: ["CLIPLoader", [20, 230], { clip_name: "umt5_xxl_fp8_e4m3fn_scaled.safetensors", type: "wan", device: "default" }],
    vae: ["VAELoader", [20, 420], { vae_name: "wan_2.1_vae.safetensors" }],
    shift: ["ModelSamplingSD3", [400, 80], { shift: 8.0 }],
    apply: ["DPCacheApply", [400, 190], { target_speedup: 3.85, refine_every: 0 }, { size: [290, 110] }],
    pos: ["CLIPTextEncode", [400, 620], { text: "a fox running through a snowy forest, tracking shot, daylight" }, { title: "CLIP Text Encode (Positive)" }],
    neg: ["CLIPTextEncode", [400, 870], { text: WAN_NEG }, { title: "CLIP Text Encode (Negative)" }],
    latent: ["EmptyHunyuanLatentVideo", [400, 1120], { width: 832, height: 480, length: 33, batch_size: 1 }],
    ks: ["KSampler", [800, 80], { seed: 42, control_after_generate: "fixed", steps: 50, cfg: 5.0, sampler_name: "uni_pc", scheduler: "simple", denoise: 1.0 }],
    dec: ["VAEDecode", [800, 560], {}],
    video: ["CreateVideo", [800, 660], { fps: 16 }],
    save: ["SaveVideo", [1120, 80], { filename_prefix: "DPCache/wan_t2v", format: "auto", codec: "auto" }, { size: [400, 360] }],
    note: ["Note", [1120, 480], {}, { size: [460, 560], text:
      "Wan2.1 text-to-video with DPCache\n\n" +
      "Models: wan2.1_t2v_1.3B (or 14B) in models/diffusion_models, umt5_xxl in models/text_encoders, wan_2.1_vae in models/vae.\n" +
      "Sampler: uni_pc, 50 steps, cfg 5 = 50 model evaluations (cond and uncond are one evaluation), so total_evaluations = 50.\n" +
      NOTE_AUTO + "\n\n" +
      "SHIPPED PACT: " + WAN_PACT + " ships with the pack: the DPCache authors' calibration of Wan2.1 image-to-video 14B (diffusers, 50 Euler steps, cfg 3; Apache-2.0, see NOTICE). It was measured on another model and schedule, so the automatic mode (calibrated on your own first run) plans this workflow better; to use it anyway, add DPCache Schedule, pick it in \"pact\" and connect it to Apply DPCache.\n\n" +
      "CALIBRATE YOUR OWN to share a PACT (several prompts averaged, a LoRA): put DPCache Calibrate in place of Apply DPCache as in the flux_calibrate workflow.\n\n" + NOTE_COMMON }],
  },
  links: [
    ["unet", 0, "shift", "model"], ["shift", 0, "apply", "model"],
    ["apply", 0, "ks", "model"], ["clip", 0, "pos", "clip"], ["clip", 0, "neg", "clip"], ["pos", 0, "ks", "positive"],
    ["neg", 0, "ks", "negative"], ["latent", 0, "ks", "latent_image"], ["ks", 0, "dec", "samples"], ["vae", 0, "dec", "vae"],
    ["dec", 0, "video", "images"], ["video", 0, "save", "video"],
  ],
};

const WAN_I2V = {
  file: "wan21_i2v_dpcache.json",
  nodes: {
    unet: ["UNETLoader", [20, 80], { unet_name: "wan2.1_i2v_480p_14B_fp16.safetensors", weight_dtype: "default" }],
    clip: ["CLIPLoader", [20, 230], { clip_name: "umt5_xxl_fp8_e4m3fn_scaled.safetensors", type: "wan", device: "default" }],
    vae: ["VAELoader", [20, 420], { vae_name: "wan_2.1_vae.safetensors" }],
    cv: ["CLIPVisionLoader", [20, 530], { clip_name: "clip_vision_h.safetensors" }],
    img: ["LoadImage", [20, 640], { image: "example.png", upload: "image" }],
    cvenc: ["CLIPVisionEncode", [20, 1060], { crop: "none" }],
    shift: ["ModelSamplingSD3", [400, 80], { shift: 8.0 }],
    apply: ["DPCacheApply", [400, 190], { target_speedup: 3.85, refine_every: 0 }, { size: [290, 110] }],
    pos: ["CLIPTextEncode", [400, 620], { text: "the fox turns its head towards the camera, snow falling gently" }, { title: "CLIP Text Encode (Positive)" }],
    neg: ["CLIPTextEncode", [400, 870], { text: WAN_NEG }, { title: "CLIP Text Encode (Negative)" }],
    i2v: ["WanImageToVideo", [400, 1120], { width: 832, height: 480, length: 33, batch_size: 1 }],
    ks: ["KSampler", [800, 80], { seed: 42, control_after_generate: "fixed", steps: 50, cfg: 5.0, sampler_name: "uni_pc", scheduler: "simple", denoise: 1.0 }],
    dec: ["VAEDecode", [800, 560], {}],
    video: ["CreateVideo", [800, 660], { fps: 16 }],
    save: ["SaveVideo", [1120, 80], { filename_prefix: "DPCache/wan_i2v", format: "auto", codec: "auto" }, { size: [400, 360] }],
    note: ["Note", [1120, 480], {}, { size: [460, 560], text:
      "Wan2.1 image-to-video with DPCache\n\n" +
      "Models: wan2.1_i2v_480p_14B in models/diffusion_models, umt5_xxl in models/text_encoders, wan_2.1_vae in models/vae, clip_vision_h in models/clip_vision. Load your start image in Load Image.\n" +
      "Sampler: uni_pc, 50 steps, cfg 5 = 50 model evaluations, so total_evaluations = 50.\n" +
      NOTE_AUTO + "\n\n" +
      "SHIPPED PACT: " + WAN_PACT + " ships with the pack: the DPCache authors' calibration of Wan2.1-I2V-14B-720P (diffusers, 50 Euler steps, cfg 3; Apache-2.0, see NOTICE). This workflow samples uni_pc at shift 8, so the automatic mode (calibrated on your own first run) fits it better; to use the shipped file anyway, add DPCache Schedule, pick it in \"pact\" and connect it to Apply DPCache.\n\n" +
      "CALIBRATE YOUR OWN to share a PACT (several image/prompt pairs averaged, a LoRA): put DPCache Calibrate in place of Apply DPCache as in the flux_calibrate workflow.\n\n" + NOTE_COMMON }],
  },
  links: [
    ["unet", 0, "shift", "model"], ["shift", 0, "apply", "model"],
    ["apply", 0, "ks", "model"], ["clip", 0, "pos", "clip"], ["clip", 0, "neg", "clip"],
    ["cv", 0, "cvenc", "clip_vision"], ["img", 0, "cvenc", "image"],
    ["pos", 0, "i2v", "positive"], ["neg", 0, "i2v", "negative"], ["vae", 0, "i2v", "vae"],
    ["cvenc", 0, "i2v", "clip_vision_output"], ["img", 0, "i2v", "start_image"],
    ["i2v", 0, "ks", "positive"], ["i2v", 1, "ks", "negative"], ["i2v", 2, "ks", "latent_image"],
    ["ks", 0, "dec", "samples"], ["vae", 0, "dec", "vae"], ["dec", 0, "video", "images"], ["video", 0, "save", "video"],
  ],
};

const NOTE_EXPERTS = `TWO EXPERTS, AUTOMATIC MODE
Wan2.2 A14B samples one trajectory with two models: the high-noise expert makes steps 0..10 (first KSamplerAdvanced), the low-noise expert steps 10..20 (second). Each expert has its own Apply DPCache with no schedule connected: each expert's window is its own setting (its own weights and part of the sigmas), so the first run calibrates both windows (computes everything) and every later run plans each window from its own file. target_speedup 2 = 5 of each expert's 10 evaluations computed; its first 3 are always computed (the cache never carries from one expert to the other).

SHIPPED PACT / ONE JOINT PLAN: ${WAN_PACT} ships with the pack (the DPCache authors' calibration of Wan2.1 image-to-video 14B, the architecture of both experts; Apache-2.0, see NOTICE). To plan both windows together instead, add one DPCache Schedule (pact = that file or your own, total_evaluations = 20, budget target speed-up) and connect it to both Apply DPCache nodes: each call then computes its part of one joint plan.

CALIBRATE YOUR OWN, both experts into one PACT: replace both Apply DPCache nodes with DPCache Calibrate, the same pact_name on both (e.g. wan22_i2v_euler_20), queue a few image/prompt pairs, press R and pick the file in DPCache Schedule's "pact". Calibrate again when you change the models, sampler, shift, resolution, step split or add a LoRA.`;

const WAN22_I2V = {
  file: "wan22_i2v_dpcache.json",
  nodes: {
    high: ["UNETLoader", [20, 80], { unet_name: "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors", weight_dtype: "default" }, { title: "Load Diffusion Model (high noise)" }],
    low: ["UNETLoader", [20, 230], { unet_name: "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors", weight_dtype: "default" }, { title: "Load Diffusion Model (low noise)" }],
    clip: ["CLIPLoader", [20, 380], { clip_name: "umt5_xxl_fp8_e4m3fn_scaled.safetensors", type: "wan", device: "default" }],
    vae: ["VAELoader", [20, 570], { vae_name: "wan_2.1_vae.safetensors" }],
    img: ["LoadImage", [20, 680], { image: "example.png", upload: "image" }],
    shifth: ["ModelSamplingSD3", [400, 80], { shift: 8.0 }],
    shiftl: ["ModelSamplingSD3", [400, 190], { shift: 8.0 }],
    applyh: ["DPCacheApply", [400, 320], { target_speedup: 2.0, refine_every: 0 }, { size: [290, 110], title: "Apply DPCache (high noise)" }],
    applyl: ["DPCacheApply", [400, 480], { target_speedup: 2.0, refine_every: 0 }, { size: [290, 110], title: "Apply DPCache (low noise)" }],
    pos: ["CLIPTextEncode", [400, 872], { text: "the fox turns its head towards the camera, snow falling gently" }, { title: "CLIP Text Encode (Positive)" }],
    neg: ["CLIPTextEncode", [400, 1028], { text: WAN_NEG }, { title: "CLIP Text Encode (Negative)" }],
    i2v: ["WanImageToVideo", [400, 1200], { width: 832, height: 480, length: 81, batch_size: 1 }],
    ksh: ["KSamplerAdvanced", [800, 80], { add_noise: "enable", noise_seed: 42, control_after_generate: "fixed", steps: 20, cfg: 3.5, sampler_name: "euler", scheduler: "simple", start_at_step: 0, end_at_step: 10, return_with_leftover_noise: "enable" }, { title: "KSampler (Advanced) high noise: steps 0..10" }],
    ksl: ["KSamplerAdvanced", [800, 440], { add_noise: "disable", noise_seed: 0, control_after_generate: "fixed", steps: 20, cfg: 3.5, sampler_name: "euler", scheduler: "simple", start_at_step: 10, end_at_step: 10000, return_with_leftover_noise: "disable" }, { title: "KSampler (Advanced) low noise: steps 10..20" }],
    dec: ["VAEDecode", [800, 800], {}],
    video: ["CreateVideo", [800, 900], { fps: 16 }],
    save: ["SaveVideo", [1120, 80], { filename_prefix: "DPCache/wan22_i2v", format: "auto", codec: "auto" }, { size: [400, 360] }],
    note: ["Note", [1120, 480], {}, { size: [460, 760], text:
      "Wan2.2 A14B image-to-video with DPCache (two experts)\n\n" +
      "Models: wan2.2_i2v_high_noise_14B and wan2.2_i2v_low_noise_14B in models/diffusion_models, umt5_xxl in models/text_encoders, wan_2.1_vae in models/vae. Load your start image in Load Image. The same graph works for Wan2.2 T2V A14B (its two t2v experts, an EmptyHunyuanLatentVideo instead of WanImageToVideo).\n" +
      "Sampler: euler, 20 steps split 10/10 as in ComfyUI's template, cfg 3.5 = 20 model evaluations in all, so total_evaluations = 20.\n\n" +
      NOTE_AUTO + "\n\n" + NOTE_EXPERTS + "\n\n" + NOTE_COMMON }],
  },
  links: [
    ["high", 0, "shifth", "model"], ["low", 0, "shiftl", "model"], ["shifth", 0, "applyh", "model"], ["shiftl", 0, "applyl", "model"],
    ["clip", 0, "pos", "clip"], ["clip", 0, "neg", "clip"],
    ["pos", 0, "i2v", "positive"], ["neg", 0, "i2v", "negative"], ["vae", 0, "i2v", "vae"], ["img", 0, "i2v", "start_image"],
    ["applyh", 0, "ksh", "model"], ["i2v", 0, "ksh", "positive"], ["i2v", 1, "ksh", "negative"], ["i2v", 2, "ksh", "latent_image"],
    ["applyl", 0, "ksl", "model"], ["i2v", 0, "ksl", "positive"], ["i2v", 1, "ksl", "negative"], ["ksh", 0, "ksl", "latent_image"],
    ["ksl", 0, "dec", "samples"], ["vae", 0, "dec", "vae"], ["dec", 0, "video", "images"], ["video", 0, "save", "video"],
  ],
};

const QWEN_IMAGE = {
  file: "qwen_image_dpcache.json",
  nodes: {
    unet: ["UNETLoader", [20, 80], { unet_name: "qwen_image_fp8_e4m3fn.safetensors", weight_dtype: "default" }],
    clip: ["CLIPLoader", [20, 230], { clip_name: "qwen_2.5_vl_7b_fp8_scaled.safetensors", type: "qwen_image", device: "default" }],
    vae: ["VAELoader", [20, 420], { vae_name: "qwen_image_vae.safetensors" }],
    shift: ["ModelSamplingAuraFlow", [400, 80], { shift: 3.1 }],
    apply: ["DPCacheApply", [400, 190], { target_speedup: 3.85, refine_every: 0 }, { size: [290, 110] }],
    pos: ["CLIPTextEncode", [400, 662], { text: "a cosy bookshop on a rainy evening, warm light in the window, a hand-painted sign that reads \"DPCache Books\"" }, { title: "CLIP Text Encode (Positive)" }],
    neg: ["CLIPTextEncode", [400, 818], { text: "" }, { title: "CLIP Text Encode (Negative)" }],
    latent: ["EmptySD3LatentImage", [400, 1020], { width: 1328, height: 1328, batch_size: 1 }],
    ks: ["KSampler", [800, 80], { seed: 42, control_after_generate: "fixed", steps: 20, cfg: 2.5, sampler_name: "euler", scheduler: "simple", denoise: 1.0 }],
    dec: ["VAEDecode", [800, 560], {}],
    save: ["SaveImage", [1120, 80], { filename_prefix: "DPCache/qwen_image" }, { size: [400, 360] }],
    note: ["Note", [1120, 480], {}, { size: [460, 600], text:
      "Qwen-Image text-to-image with DPCache\n\n" +
      "Models: qwen_image (fp8 or bf16) in models/diffusion_models, qwen_2.5_vl_7b in models/text_encoders, qwen_image_vae in models/vae.\n" +
      "Sampler: euler, 20 steps, cfg 2.5 = 20 model evaluations (cond and uncond are one evaluation); target_speedup 3.85 plans 5 of them after the first run.\n" +
      "Qwen-Image has only double-stream blocks; DPCache predicts the image stream after the last one. A Qwen ControlNet that patches the blocks (DiffSynth model patch) adds features between them, so DPCache then computes every evaluation and says so.\n" +
      NOTE_AUTO + "\n\n" +
      "No Qwen-Image PACT ships with the pack. CALIBRATE YOUR OWN to share one (several prompts averaged): put DPCache Calibrate (pact_name e.g. qwen_image_euler_simple_20) in place of Apply DPCache and queue a few prompts, as in the flux_calibrate workflow.\n\n" + NOTE_COMMON }],
  },
  links: [
    ["unet", 0, "shift", "model"], ["shift", 0, "apply", "model"],
    ["apply", 0, "ks", "model"], ["clip", 0, "pos", "clip"], ["clip", 0, "neg", "clip"], ["pos", 0, "ks", "positive"],
    ["neg", 0, "ks", "negative"], ["latent", 0, "ks", "latent_image"], ["ks", 0, "dec", "samples"], ["vae", 0, "dec", "vae"],
    ["dec", 0, "save", "images"],
  ],
};

export const SPECS = [FLUX_T2I, FLUX_CAL, WAN_T2V, WAN_I2V, WAN22_I2V, QWEN_IMAGE];

/** Runs in the page: builds the graph from a spec with LiteGraph and returns graph.serialize(). */
export function buildInPage(spec) {
  const app = window.comfyAPI.app.app;
  const LG = window.LiteGraph;
  app.graph.clear();
  const made = {};
  for (const [key, [type, pos, widgets, opts = {}]] of Object.entries(spec.nodes)) {
    const n = LG.createNode(type);
    if (!n) throw new Error("unknown node type " + type);
    n.pos = pos;
    app.graph.add(n);
    if (opts.title) n.title = opts.title;
    const vals = { ...widgets };
    if (opts.text != null) vals.text = opts.text;
    for (const [name, value] of Object.entries(vals)) {
      const w = n.widgets?.find((x) => x.name === name);
      if (!w) throw new Error(`${type} has no widget ${name}`);
      w.value = value;
    }
    if (opts.size) n.setSize(opts.size);
    made[key] = n;
  }
  for (const [a, slot, b, input] of spec.links) {
    const idx = made[b].findInputSlot(input);
    if (idx < 0) throw new Error(`${made[b].type} has no input ${input}`);
    if (!made[a].connect(slot, made[b], idx)) throw new Error(`cannot connect ${a}:${slot} -> ${b}.${input}`);
  }
  app.graph.setDirtyCanvas(true, true);
  return app.graph.serialize();
}

async function main() {
  const context = await launch();
  try {
    const { page } = await openComfy(context, url);
    for (const spec of SPECS) {
      const wf = await page.evaluate(buildInPage, spec);
      wf.extra = { ds: { scale: 0.8, offset: [40, 40] } };
      writeFileSync(join(ROOT, "workflows", spec.file), JSON.stringify(wf, null, 2) + "\n");
      console.log(`wrote workflows/${spec.file}: ${wf.nodes.length} nodes, ${wf.links.length} links`);
    }
  } finally {
    await context.close();
  }
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  main().catch((e) => {
    console.error(e);
    process.exit(1);
  });
}
