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

const NOTE_COMMON = `WHAT THE SETTINGS MEAN
- key_steps (K): how many of the T model evaluations are computed in full. The others skip every transformer block and predict its output with a Taylor expansion. Ideal speed-up = T / K (K=13 of 50: 3.85x, K=9: 5.56x). Smaller K = faster, less faithful.
- total_evaluations (T): the model evaluations (uniform) and (manual) plan for. euler, uni_pc and other one-step samplers: T = steps; heun makes about 2x steps. A PACT file fixes T itself. A run with another count (other steps, sampler, or a KSamplerAdvanced slice) is re-planned for it when sampling starts, from the PACT transferred to that count; (manual) stops with a clear error instead.
- budget: how K follows such a run. same speed-up scales K with the count (K=13 of 50 -> 7 of 28), target speed-up plans count / target_speedup, fixed K keeps K.
- first_full_steps / last_full_steps: evaluations always computed at the start / end (the image changes fastest at the start).
- pact: "(uniform)" spaces the key steps evenly and "(manual)" takes manual_key_steps (e.g. "0, 1, 2, 5, 9-11"); both work without calibrating. A calibrated PACT lets DPCache plan the key steps globally (dynamic programming over the path-aware cost tensor), which is what gives the paper its quality at high speed-ups.

EXPECTED SPEED-UP: about T/K minus overhead. The paper reports 3.54x at K=13 and 4.87x at K=9 on FLUX.1-dev, 50 steps (ideal 3.85x / 5.56x). The one-line report in the console after each run gives the measured numbers. To compare with full compute, select "Apply DPCache" and press Ctrl+B (bypass).
The picture output shows the schedule: the PACT heatmap with the chosen path, or a timeline of key and predicted evaluations.`;

const FLUX_PACT = "flux1_dev_official_T50.safetensors";
const WAN_PACT = "wan21_i2v_14b_official_T50.safetensors";

const FLUX_T2I = {
  file: "flux_t2i_dpcache.json",
  nodes: {
    unet: ["UNETLoader", [20, 80], { unet_name: "flux1-dev.safetensors", weight_dtype: "default" }],
    clip: ["DualCLIPLoader", [20, 230], { clip_name1: "clip_l.safetensors", clip_name2: "t5xxl_fp16.safetensors", type: "flux", device: "default" }],
    vae: ["VAELoader", [20, 420], { vae_name: "ae.safetensors" }],
    sched: ["DPCacheSchedule", [400, 80], { pact: FLUX_PACT, key_steps: 13, first_full_steps: 3, last_full_steps: 0, total_evaluations: 50, manual_key_steps: "", budget: "same speed-up", target_speedup: 3.85, taylor_order: 2, forecaster: "spectral" }],
    apply: ["DPCacheApply", [400, 410], {}, { size: [240, 50] }],
    pos: ["CLIPTextEncode", [400, 510], { text: "a red fox sitting in fresh snow at sunrise, soft golden light, detailed fur, shallow depth of field" }, { title: "CLIP Text Encode (Prompt)" }],
    guid: ["FluxGuidance", [400, 760], { guidance: 3.5 }],
    neg: ["ConditioningZeroOut", [400, 868], {}],
    latent: ["EmptySD3LatentImage", [400, 944], { width: 1024, height: 1024, batch_size: 1 }],
    ks: ["KSampler", [800, 80], { seed: 42, control_after_generate: "fixed", steps: 50, cfg: 1.0, sampler_name: "euler", scheduler: "simple", denoise: 1.0 }],
    dec: ["VAEDecode", [800, 560], {}],
    save: ["SaveImage", [1120, 80], { filename_prefix: "DPCache/flux" }, { size: [400, 360] }],
    pic: ["PreviewImage", [800, 680], {}, { title: "DPCache schedule picture", size: [300, 300] }],
    note: ["Note", [1120, 480], {}, { size: [460, 560], text:
      "FLUX.1-dev text-to-image with DPCache\n\n" +
      "Models: flux1-dev.safetensors in models/diffusion_models, clip_l + t5xxl in models/text_encoders, ae.safetensors in models/vae.\n" +
      "Sampler: euler, 50 steps, cfg 1 (FLUX guidance 3.5) = 50 model evaluations, so total_evaluations = 50.\n\n" +
      "PACT: " + FLUX_PACT + " ships with the pack: the DPCache authors' calibration of FLUX.1-dev (diffusers, 50 Euler steps, guidance 3.5; Apache-2.0, see NOTICE). ComfyUI's euler / simple at 1024x1024 makes the same sigmas, so it fits this workflow as it is.\n\n" +
      "CALIBRATE YOUR OWN when you change what it was measured on: a fine-tuned model or a LoRA, another sampler, scheduler or shift, another resolution, another step count. A PACT calibrated with your own settings measures exactly the trajectories you run. How: open the flux_calibrate workflow, keep your settings, queue 5-10 prompts, press R (refresh) and pick the new file in \"pact\".\n\n" + NOTE_COMMON }],
  },
  links: [
    ["unet", 0, "apply", "model"], ["sched", 0, "apply", "schedule"], ["sched", 1, "pic", "images"],
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
    cal: ["DPCacheCalibrate", [400, 80], { pact_name: "flux_dev_euler_50", order: 1, reset: false, sample_size: 65536 }],
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
      "3. Press R to refresh, then pick flux_dev_euler_50.safetensors in the 'pact' list of DPCache Schedule (flux_t2i_dpcache workflow).\n\n" +
      "- pact_name: the file in models/dpcache/; runs with the same name accumulate (samples are averaged).\n" +
      "- order: Taylor order of the predictor the PACT is built for. 1 (default) lets the DP plan exactly what runs later and won in our benchmarks; 2 is the paper's choice.\n" +
      "- reset: start the file afresh on the next finished run.\n" +
      "- sample_size: how many cache-point elements (a fixed random pick) estimate the PACT; 65536 keeps about 13 MB per stream at any resolution, 0 records every element (exact, gigabytes at 1024x1024).\n" +
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
    sched: ["DPCacheSchedule", [400, 190], { pact: WAN_PACT, key_steps: 13, first_full_steps: 3, last_full_steps: 0, total_evaluations: 50, manual_key_steps: "", budget: "same speed-up", target_speedup: 3.85, taylor_order: 2, forecaster: "spectral" }],
    apply: ["DPCacheApply", [400, 520], {}, { size: [240, 50] }],
    pos: ["CLIPTextEncode", [400, 620], { text: "a fox running through a snowy forest, tracking shot, daylight" }, { title: "CLIP Text Encode (Positive)" }],
    neg: ["CLIPTextEncode", [400, 870], { text: WAN_NEG }, { title: "CLIP Text Encode (Negative)" }],
    latent: ["EmptyHunyuanLatentVideo", [400, 1120], { width: 832, height: 480, length: 33, batch_size: 1 }],
    ks: ["KSampler", [800, 80], { seed: 42, control_after_generate: "fixed", steps: 50, cfg: 5.0, sampler_name: "uni_pc", scheduler: "simple", denoise: 1.0 }],
    dec: ["VAEDecode", [800, 560], {}],
    video: ["CreateVideo", [800, 660], { fps: 16 }],
    save: ["SaveVideo", [1120, 80], { filename_prefix: "DPCache/wan_t2v", format: "auto", codec: "auto" }, { size: [400, 360] }],
    pic: ["PreviewImage", [800, 780], {}, { title: "DPCache schedule picture", size: [300, 300] }],
    note: ["Note", [1120, 480], {}, { size: [460, 560], text:
      "Wan2.1 text-to-video with DPCache\n\n" +
      "Models: wan2.1_t2v_1.3B (or 14B) in models/diffusion_models, umt5_xxl in models/text_encoders, wan_2.1_vae in models/vae.\n" +
      "Sampler: uni_pc, 50 steps, cfg 5 = 50 model evaluations (cond and uncond are one evaluation), so total_evaluations = 50.\n" +
      "PACT: " + WAN_PACT + " ships with the pack: the DPCache authors' calibration of Wan2.1 image-to-video 14B (diffusers, 50 Euler steps, cfg 3; Apache-2.0, see NOTICE). Here it plans for another model (text-to-video) and another schedule (uni_pc at shift 8 spends more steps at high noise), so it gives the key steps their general shape, not a calibration of this run.\n\n" +
      "CALIBRATE YOUR OWN for the best schedule: put DPCache Calibrate (pact_name e.g. wan21_t2v_unipc_50) in place of Apply DPCache, queue a few prompts with your model, sampler, shift, resolution and step count (as in the flux_calibrate workflow), press R (refresh) and pick the new file in \"pact\". Calibrate again when you change any of them or add a LoRA.\n\n" + NOTE_COMMON }],
  },
  links: [
    ["unet", 0, "shift", "model"], ["shift", 0, "apply", "model"], ["sched", 0, "apply", "schedule"], ["sched", 1, "pic", "images"],
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
    sched: ["DPCacheSchedule", [400, 190], { pact: WAN_PACT, key_steps: 13, first_full_steps: 3, last_full_steps: 0, total_evaluations: 50, manual_key_steps: "", budget: "same speed-up", target_speedup: 3.85, taylor_order: 2, forecaster: "spectral" }],
    apply: ["DPCacheApply", [400, 520], {}, { size: [240, 50] }],
    pos: ["CLIPTextEncode", [400, 620], { text: "the fox turns its head towards the camera, snow falling gently" }, { title: "CLIP Text Encode (Positive)" }],
    neg: ["CLIPTextEncode", [400, 870], { text: WAN_NEG }, { title: "CLIP Text Encode (Negative)" }],
    i2v: ["WanImageToVideo", [400, 1120], { width: 832, height: 480, length: 33, batch_size: 1 }],
    ks: ["KSampler", [800, 80], { seed: 42, control_after_generate: "fixed", steps: 50, cfg: 5.0, sampler_name: "uni_pc", scheduler: "simple", denoise: 1.0 }],
    dec: ["VAEDecode", [800, 560], {}],
    video: ["CreateVideo", [800, 660], { fps: 16 }],
    save: ["SaveVideo", [1120, 80], { filename_prefix: "DPCache/wan_i2v", format: "auto", codec: "auto" }, { size: [400, 360] }],
    pic: ["PreviewImage", [800, 780], {}, { title: "DPCache schedule picture", size: [300, 300] }],
    note: ["Note", [1120, 480], {}, { size: [460, 560], text:
      "Wan2.1 image-to-video with DPCache\n\n" +
      "Models: wan2.1_i2v_480p_14B in models/diffusion_models, umt5_xxl in models/text_encoders, wan_2.1_vae in models/vae, clip_vision_h in models/clip_vision. Load your start image in Load Image.\n" +
      "Sampler: uni_pc, 50 steps, cfg 5 = 50 model evaluations, so total_evaluations = 50.\n" +
      "PACT: " + WAN_PACT + " ships with the pack: the DPCache authors' calibration of Wan2.1-I2V-14B-720P (diffusers, 50 Euler steps, cfg 3; Apache-2.0, see NOTICE). This workflow samples uni_pc at shift 8, which spends more of its steps at high noise than the authors' run, so the PACT gives the key steps their general shape, not a calibration of this run.\n\n" +
      "CALIBRATE YOUR OWN for the best schedule: put DPCache Calibrate (pact_name e.g. wan21_i2v_unipc_50) in place of Apply DPCache, queue a few image/prompt pairs with your model, sampler, shift, resolution and step count (as in the flux_calibrate workflow), press R (refresh) and pick the new file in \"pact\". Calibrate again when you change any of them or add a LoRA.\n\n" + NOTE_COMMON }],
  },
  links: [
    ["unet", 0, "shift", "model"], ["shift", 0, "apply", "model"], ["sched", 0, "apply", "schedule"], ["sched", 1, "pic", "images"],
    ["apply", 0, "ks", "model"], ["clip", 0, "pos", "clip"], ["clip", 0, "neg", "clip"],
    ["cv", 0, "cvenc", "clip_vision"], ["img", 0, "cvenc", "image"],
    ["pos", 0, "i2v", "positive"], ["neg", 0, "i2v", "negative"], ["vae", 0, "i2v", "vae"],
    ["cvenc", 0, "i2v", "clip_vision_output"], ["img", 0, "i2v", "start_image"],
    ["i2v", 0, "ks", "positive"], ["i2v", 1, "ks", "negative"], ["i2v", 2, "ks", "latent_image"],
    ["ks", 0, "dec", "samples"], ["vae", 0, "dec", "vae"], ["dec", 0, "video", "images"], ["video", 0, "save", "video"],
  ],
};

const NOTE_EXPERTS = `TWO EXPERTS, ONE SCHEDULE
Wan2.2 A14B samples one trajectory with two models: the high-noise expert makes steps 0..10 (first KSamplerAdvanced), the low-noise expert steps 10..20 (second). Each expert has its own Apply DPCache; both take the same DPCache Schedule. When sampling starts, each call finds its window of the 20 evaluations from its sigmas and computes only its part of one joint plan. Its first evaluations (first_full_steps) are always computed: the cache never carries from one expert to the other. You never count evaluations per expert: leave total_evaluations = steps (20). The report after each run says what that expert computed.

PACT: ${WAN_PACT} ships with the pack: the DPCache authors' calibration of Wan2.1 image-to-video 14B (diffusers, 50 Euler steps; Apache-2.0, see NOTICE), the architecture of both Wan2.2 experts. It is transferred to this run's 20 evaluations and gives the key steps their general shape, not a calibration of these experts. budget = target speed-up 2x: 10 of the 20 evaluations computed in all.

CALIBRATE YOUR OWN, both experts into one PACT (best): replace both Apply DPCache nodes with DPCache Calibrate, the same pact_name on both (e.g. wan22_i2v_euler_20), and queue a few image/prompt pairs. Each expert adds its window to that one file. Press R (refresh) and pick the file in "pact": the dynamic programming plans both windows together and gives each expert the share of the key steps that lowers the total predicted error. A PACT with one expert's window only plans that expert. Calibrate again when you change the models, sampler, shift, resolution, step split or add a LoRA.`;

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
    sched: ["DPCacheSchedule", [400, 300], { pact: WAN_PACT, key_steps: 10, first_full_steps: 2, last_full_steps: 0, total_evaluations: 20, manual_key_steps: "", budget: "target speed-up", target_speedup: 2.0, taylor_order: 2, forecaster: "spectral" }],
    applyh: ["DPCacheApply", [400, 672], {}, { size: [240, 50], title: "Apply DPCache (high noise)" }],
    applyl: ["DPCacheApply", [400, 772], {}, { size: [240, 50], title: "Apply DPCache (low noise)" }],
    pos: ["CLIPTextEncode", [400, 872], { text: "the fox turns its head towards the camera, snow falling gently" }, { title: "CLIP Text Encode (Positive)" }],
    neg: ["CLIPTextEncode", [400, 1028], { text: WAN_NEG }, { title: "CLIP Text Encode (Negative)" }],
    i2v: ["WanImageToVideo", [400, 1200], { width: 832, height: 480, length: 81, batch_size: 1 }],
    ksh: ["KSamplerAdvanced", [800, 80], { add_noise: "enable", noise_seed: 42, control_after_generate: "fixed", steps: 20, cfg: 3.5, sampler_name: "euler", scheduler: "simple", start_at_step: 0, end_at_step: 10, return_with_leftover_noise: "enable" }, { title: "KSampler (Advanced) high noise: steps 0..10" }],
    ksl: ["KSamplerAdvanced", [800, 440], { add_noise: "disable", noise_seed: 0, control_after_generate: "fixed", steps: 20, cfg: 3.5, sampler_name: "euler", scheduler: "simple", start_at_step: 10, end_at_step: 10000, return_with_leftover_noise: "disable" }, { title: "KSampler (Advanced) low noise: steps 10..20" }],
    dec: ["VAEDecode", [800, 800], {}],
    video: ["CreateVideo", [800, 900], { fps: 16 }],
    save: ["SaveVideo", [1120, 80], { filename_prefix: "DPCache/wan22_i2v", format: "auto", codec: "auto" }, { size: [400, 360] }],
    pic: ["PreviewImage", [800, 1020], {}, { title: "DPCache schedule picture", size: [300, 300] }],
    note: ["Note", [1120, 480], {}, { size: [460, 760], text:
      "Wan2.2 A14B image-to-video with DPCache (two experts)\n\n" +
      "Models: wan2.2_i2v_high_noise_14B and wan2.2_i2v_low_noise_14B in models/diffusion_models, umt5_xxl in models/text_encoders, wan_2.1_vae in models/vae. Load your start image in Load Image. The same graph works for Wan2.2 T2V A14B (its two t2v experts, an EmptyHunyuanLatentVideo instead of WanImageToVideo).\n" +
      "Sampler: euler, 20 steps split 10/10 as in ComfyUI's template, cfg 3.5 = 20 model evaluations in all, so total_evaluations = 20.\n\n" +
      NOTE_EXPERTS + "\n\n" + NOTE_COMMON }],
  },
  links: [
    ["high", 0, "shifth", "model"], ["low", 0, "shiftl", "model"], ["shifth", 0, "applyh", "model"], ["shiftl", 0, "applyl", "model"],
    ["sched", 0, "applyh", "schedule"], ["sched", 0, "applyl", "schedule"], ["sched", 1, "pic", "images"],
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
    sched: ["DPCacheSchedule", [400, 190], { pact: "(uniform)", key_steps: 10, first_full_steps: 3, last_full_steps: 0, total_evaluations: 20, manual_key_steps: "", budget: "same speed-up", target_speedup: 3.85, taylor_order: 2, forecaster: "spectral" }],
    apply: ["DPCacheApply", [400, 562], {}, { size: [240, 50] }],
    pos: ["CLIPTextEncode", [400, 662], { text: "a cosy bookshop on a rainy evening, warm light in the window, a hand-painted sign that reads \"DPCache Books\"" }, { title: "CLIP Text Encode (Positive)" }],
    neg: ["CLIPTextEncode", [400, 818], { text: "" }, { title: "CLIP Text Encode (Negative)" }],
    latent: ["EmptySD3LatentImage", [400, 1020], { width: 1328, height: 1328, batch_size: 1 }],
    ks: ["KSampler", [800, 80], { seed: 42, control_after_generate: "fixed", steps: 20, cfg: 2.5, sampler_name: "euler", scheduler: "simple", denoise: 1.0 }],
    dec: ["VAEDecode", [800, 560], {}],
    save: ["SaveImage", [1120, 80], { filename_prefix: "DPCache/qwen_image" }, { size: [400, 360] }],
    pic: ["PreviewImage", [800, 680], {}, { title: "DPCache schedule picture", size: [300, 300] }],
    note: ["Note", [1120, 480], {}, { size: [460, 600], text:
      "Qwen-Image text-to-image with DPCache\n\n" +
      "Models: qwen_image (fp8 or bf16) in models/diffusion_models, qwen_2.5_vl_7b in models/text_encoders, qwen_image_vae in models/vae.\n" +
      "Sampler: euler, 20 steps, cfg 2.5 = 20 model evaluations (cond and uncond are one evaluation), so total_evaluations = 20; key_steps 10 = ideal 2x.\n" +
      "Qwen-Image has only double-stream blocks; DPCache predicts the image stream after the last one. A Qwen ControlNet that patches the blocks (DiffSynth model patch) adds features between them, so DPCache then computes every evaluation and says so.\n" +
      "Calibrate for Qwen-Image by putting DPCache Calibrate (pact_name e.g. qwen_image_euler_20) in place of Apply DPCache and queueing a few prompts, as in the flux_calibrate workflow.\n\n" + NOTE_COMMON }],
  },
  links: [
    ["unet", 0, "shift", "model"], ["shift", 0, "apply", "model"], ["sched", 0, "apply", "schedule"], ["sched", 1, "pic", "images"],
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
