"""UI-format workflow -> API prompt, and the test-only mapping onto the tiny host models.

`ui_to_api` follows what the frontend's graphToPrompt does for the nodes used here: widget
values are consumed in input-definition order (required, then optional); a seed with
`control_after_generate` and an image combo with `image_upload` each carry one extra saved
value; linked inputs become [source id, output slot]; Note nodes and muted/bypassed nodes
are left out. test_browser.py compares its output with the real frontend's graphToPrompt.
"""
from __future__ import annotations

import copy

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}


def is_widget(spec) -> bool:
    t = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (isinstance(t, list) or t in WIDGET_TYPES) and not opts.get("forceInput")


def input_specs(defn):
    """[(name, spec)] in the order the frontend creates widgets: required, then optional."""
    inp = defn.get("input", defn)
    return [(k, v) for sec in ("required", "optional") for k, v in (inp.get(sec) or {}).items()]


def widget_names(defn):
    """Names of the saved widget values, in order; extra frontend widgets as '<name>:control' / ':upload'."""
    names = []
    for name, spec in input_specs(defn):
        if not is_widget(spec):
            continue
        names.append(name)
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if opts.get("control_after_generate"):
            names.append(name + ":control")
        if opts.get("image_upload"):
            names.append(name + ":upload")
    return names


def ui_to_api(wf, defs):
    links = {l[0]: l for l in wf.get("links", [])}
    api = {}
    for n in wf["nodes"]:
        if n["type"] in FRONTEND_ONLY or n.get("mode", 0) in (2, 4):
            continue
        defn = defs[n["type"]]
        linked = {i["name"]: links[i["link"]] for i in n.get("inputs", []) if i.get("link") is not None}
        values = dict(zip(widget_names(defn), n.get("widgets_values") or []))
        inputs = {}
        for name, spec in input_specs(defn):
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
            elif is_widget(spec) and name in values:
                inputs[name] = values[name]
        api[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return api


# ---- test-only stand-ins for the optional tiny models and encoder nodes (not shipped here) -----------------------------
TINY_UNET = {"flux": "tiny_flux.safetensors", "wan_t2v": "tiny_wan_t2v.safetensors", "wan_i2v": "tiny_wan_i2v.safetensors",
             "qwen_image": "tiny_qwen_image.safetensors", "wan22_high": "tiny_wan22_high.safetensors",
             "wan22_low": "tiny_wan22_low.safetensors"}
SAMPLERS = ("KSampler", "KSamplerAdvanced")
# loaders, encoders, decoders and savers that need the real (absent) models: dropped
DROP = {"DualCLIPLoader", "CLIPLoader", "VAELoader", "CLIPVisionLoader", "LoadImage", "CLIPVisionEncode",
        "VAEDecode", "SaveImage", "CreateVideo", "SaveVideo", "SaveAnimatedWEBP"}


def model_of(unet_name):
    """The tiny stand-in for a real model file name."""
    name = unet_name.lower()
    if "flux" in name:
        return "flux"
    if "qwen" in name:
        return "qwen_image"
    if "wan2.2" in name and "high_noise" in name:  # the A14B experts (the tiny ones are T2V)
        return "wan22_high"
    if "wan2.2" in name and "low_noise" in name:
        return "wan22_low"
    if "i2v" in name:
        return "wan_i2v"
    if "wan" in name:
        return "wan_t2v"
    raise ValueError(f"no tiny stand-in for {unet_name}")


def family_of(api):
    for n in api.values():
        if n["class_type"] == "UNETLoader":
            return model_of(n["inputs"]["unet_name"])
    raise ValueError("no UNETLoader with a FLUX, Qwen-Image or Wan model in this workflow")


def to_harness(api, label, size=128, frames=9, tokens=16):
    """The same graph on the tiny models: UNETLoader -> tiny_*, text encoders -> HarnessRandomConditioning,
    empty latents / WanImageToVideo -> harness stand-ins at a small size, VAE/CLIP-vision/savers dropped,
    a HarnessBlockCounter before every KSampler's model and a HarnessLatentStats on its output.
    The pack's nodes, KSampler (steps, sampler, cfg...) and conditioning utilities stay as they are."""
    fam = family_of(api)
    wan = "wan" if fam.startswith("wan") else fam
    out = copy.deepcopy(api)
    for nid, n in list(out.items()):
        ct, i = n["class_type"], n["inputs"]
        if ct == "UNETLoader":
            i.update(unet_name=TINY_UNET[model_of(i["unet_name"])], weight_dtype="default")
        elif ct in ("CLIPTextEncode", "CLIPTextEncodeFlux"):
            out[nid] = {"class_type": "HarnessRandomConditioning",
                        "inputs": {"seed": int(nid), "family": wan, "tokens": tokens, "scale": 1.0, "batch_size": 1}}
        elif ct == "EmptySD3LatentImage":
            out[nid] = {"class_type": "HarnessEmptyLatent", "inputs": {"family": wan, "width": size, "height": size,
                                                                         "length": 1, "batch_size": i.get("batch_size", 1)}}
        elif ct == "EmptyHunyuanLatentVideo":
            out[nid] = {"class_type": "HarnessEmptyLatent", "inputs": {"family": "wan", "width": size, "height": size,
                                                                         "length": frames, "batch_size": 1}}
        elif ct == "WanImageToVideo":
            i2v = fam == "wan_i2v"  # the tiny Wan2.2 experts are T2V: no start image, no CLIP vision
            out[nid] = {"class_type": "HarnessWanI2VConditioning", "inputs": {
                "positive": i["positive"], "negative": i["negative"], "seed": 3, "width": size, "height": size,
                "length": frames, "batch_size": 1, "start_frames": 1 if i2v else 0,
                "clip_vision": i2v and "clip_vision_output" in i, "clip_tokens": 257, "scale": 1.0}}
        elif ct in DROP:
            del out[nid]
    # drop whatever consumed a dropped node (e.g. a PreviewImage of the decoded image)
    changed = True
    while changed:
        changed = False
        for nid, n in list(out.items()):
            if any(isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and v[0] not in out
                   for v in n["inputs"].values()):
                del out[nid]
                changed = True
    next_id = max(int(k) for k in out) + 1
    for nid, n in list(out.items()):
        if n["class_type"] not in SAMPLERS:
            continue
        tag = f"{label}_{nid}"
        out[str(next_id)] = {"class_type": "HarnessBlockCounter", "inputs": {"model": n["inputs"]["model"], "tag": tag}}
        n["inputs"]["model"] = [str(next_id), 0]
        out[str(next_id + 1)] = {"class_type": "HarnessLatentStats",
                                 "inputs": {"samples": [nid, 0], "label": label, "counter_tag": tag}}
        next_id += 2
    return out
