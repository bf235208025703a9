"""
Reward functions for Flow-OPD: one registry for the two worlds the code runs in.

    reward = get_reward("ocr", world="sd3")               # or world="tiny"
    r = reward(images, prompts, metadata)                 # images (B,3,H,W) in [0,1] -> (B,) float32

    total_fn = combined_reward("pickscore:1,deqa:0.2", "sd3", pickscore=dict(model="/ckpt/PickScore_v1"))
    total, parts = total_fn(images, prompts, metadata)    # parts: {name: unweighted (B,) scores}

World "tiny": geneval/ocr/deqa/pickscore are the synthetic scorers of tiny_world.py (CPU tests and
the tiny end-to-end runs); objects (evaluation only) is the share of a scene prompt's named objects drawn.
World "sd3": the real scorers Flow-GRPO trains and evaluates with:
  ocr        Flow-GRPO's rule on PaddleOCR 2.9.1's English text where installed, else rapidocr (ONNX, offline:
             English models from FLOWOPD_OCR_MODELS, or the wheel's bundled ones)
  pickscore  PickScore_v1 (a CLIP-H fine-tune): logit_scale * cos(image, text) / 26
  aesthetic  LAION improved-aesthetic-predictor MLP on CLIP ViT-L/14 image embeddings (evaluation only)
  imagereward, hpsv2   ImageReward-v1.0 and HPS-v2.1 (evaluation only; optional packages image-reward, hpsv2)
  geneval    HTTP client of the GenEval reward server (yifan123/reward-server, app_geneval.py)
  deqa       HTTP client of the DeQA-Score reward server (yifan123/reward-server, app_deqa.py)
Model-backed scorers load on their first call and are cached (one model per name, device and options),
so constructing reward functions is cheap and needs no network or GPU. The HTTP clients hold no state.

On a GPU rank, pass the rank's device: PickScore and the aesthetic CLIP then run there, in float16 on CUDA
(device=None keeps them on the CPU, where torchrun's one OpenMP thread per rank takes seconds an image).
OCR stays on the CPU, with onnxruntime's threads split between the ranks of a node; the HTTP clients
ignore the device.

    reward = get_reward("pickscore", "sd3", device=dist.device)
    scorer = BatchScorer(task_reward)                     # score batch k while batch k+1 is sampled
    scorer.submit(images, prompts, metadata, tasks)       # per decoded batch; returns at once
    scores = scorer.result()                              # float32 (N,) on CPU, in submission order

Environment (each also an option of get_reward, which wins):
  FLOWOPD_PICKSCORE_MODEL, FLOWOPD_PICKSCORE_PROCESSOR   local folders for PickScore (offline clusters)
  FLOWOPD_AESTHETIC_CLIP, FLOWOPD_AESTHETIC_MLP          CLIP ViT-L/14 folder, the predictor's .pth
  FLOWOPD_IMAGEREWARD_DIR    a folder with ImageReward.pt and med_config.json (hf download THUDM/ImageReward)
  FLOWOPD_HPSV2_CHECKPOINT   HPS_v2.1_compressed.pt (hf download xswu/HPSv2)
  FLOWOPD_OCR_THREADS        OCR threads per process (default: cores // LOCAL_WORLD_SIZE)
  FLOWOPD_OCR_ENGINE         paddleocr (Flow-GRPO's), rapidocr, or auto (default: paddleocr where installed)
  FLOWOPD_OCR_MODELS         rapidocr: a folder of English det/rec ONNX models + character list (else bundled)
  FLOWOPD_GENEVAL_URL, FLOWOPD_DEQA_URL, FLOWOPD_REWARD_TIMEOUT (seconds a server may take per batch)

Optional dependencies: paddleocr or rapidocr + onnxruntime for ocr; transformers for pickscore/aesthetic;
image-reward for imagereward, hpsv2 for hpsv2.
"""

import concurrent.futures
import io
import os
import pickle
import queue
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import torch

# -----------------------------------------------------------------------------
# names and constants

TINY_REWARDS = ("geneval", "ocr", "deqa", "pickscore")  # == tiny_world.TASKS
TINY_METRICS = ("objects",)  # tiny-world evaluation scores get_reward also gives (evaluate.py's quality table)
SD3_REWARDS = ("geneval", "ocr", "deqa", "pickscore", "aesthetic", "imagereward", "hpsv2")
PICKSCORE_SCALE = 26.0  # Flow-GRPO divides PickScore (~ 18-24) by 26 to bring it near [0, 1]
DEQA_MAX = 5.0          # DeQA-Score is a 1-5 mean-opinion score; the paper's Average divides by 5
OCR_MIN_SIDE = 256      # PP-OCR's detector misses text on small images: upsample below this ...
OCR_UPSAMPLE_TO = 512   # ... to this shorter side (SD3's training resolution)
REMOTE_BATCH = 64       # images per HTTP request, as Flow-GRPO's clients
DEFAULT_URLS = {        # env var, default; same ports as Flow-GRPO's clients
    "geneval": ("FLOWOPD_GENEVAL_URL", "http://127.0.0.1:18085"),
    "deqa": ("FLOWOPD_DEQA_URL", "http://127.0.0.1:18086"),
}

# -----------------------------------------------------------------------------
# image conversion shared by the scorers


def _to_uint8(images):
    """(B,3,H,W) float in [0,1] -> (B,H,W,3) uint8, rounding as Flow-GRPO does."""
    images = (images.detach().float().cpu() * 255).round().clamp(0, 255).to(torch.uint8)
    return images.permute(0, 2, 3, 1).numpy()


def _to_pil(images):
    from PIL import Image

    return [Image.fromarray(image) for image in _to_uint8(images)]


def _embedding(output):
    """transformers 5 get_*_features return a model output (projection in pooler_output); 4.x a tensor."""
    return output if torch.is_tensor(output) else output.pooler_output


def _from_pretrained(cls, path, reward, option, env):
    """from_pretrained with one clear line when the weights are not there (offline, wrong path)."""
    how = f"download it once and pass {option}=/path/to/local/copy or set {env}"
    if os.path.isabs(path) or path.startswith((".", "~")):  # meant as a folder, not a hub id
        path = os.path.expanduser(path)
        if not os.path.isdir(path):  # say so, rather than transformers' "not a valid repo id"
            raise RuntimeError(f"{reward} reward: cannot load {cls.__name__} from '{path}': no such folder; {how}")
    try:
        return cls.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise RuntimeError(f"{reward} reward: cannot load {cls.__name__} from '{path}' ({type(e).__name__}; "
                           f"offline or not a local copy): {how}") from None


def _scorer_dtype(device):
    """The dtype a CLIP scorer runs in on `device`: float16 on CUDA (half the memory next to the policy,
    tensor cores), float32 elsewhere (CPU half precision is slow)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def _resolve_device(device):
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        # "cuda" means the rank's current device, but a scorer may run on BatchScorer's thread, whose
        # current device is cuda:0 whatever torch.cuda.set_device the rank called: pin the index now
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# -----------------------------------------------------------------------------
# OCR (Flow-GRPO's rule on rapidocr's text)


def levenshtein(a: str, b: str) -> int:
    """Edit distance with unit costs; the ground floor's implementation (tiny_world imports no project file)."""
    from tiny_world import levenshtein as edit_distance

    return edit_distance(a, b)


def ocr_target(prompt: str) -> str:
    """The text the image must show: what lies inside the first pair of double quotes."""
    parts = prompt.split('"')
    if len(parts) < 3 or not parts[1].replace(" ", ""):
        raise ValueError(f"OCR reward needs the target text in double quotes; prompt has none: {prompt!r}")
    return parts[1]


def ocr_reward_from_text(recognised: str, prompt: str) -> float:
    """Flow-GRPO's OCR reward: 1 - min(dist, len)/len on lowercased, space-free strings, where dist
    is 0 when the target appears anywhere in the recognised text (extra words cost nothing) and the
    Levenshtein distance otherwise (capped: a page of unrelated text scores 0, not below)."""
    target = ocr_target(prompt).replace(" ", "").lower()
    recognised = recognised.replace(" ", "").lower()
    dist = 0 if target in recognised else levenshtein(recognised, target)
    return 1.0 - min(dist, len(target)) / len(target)


def _available_cores():
    """The cores this process may run on (a Slurm or taskset mask may give it fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _ocr_threads(threads=None):
    """onnxruntime's threads for this process: threads=, else FLOWOPD_OCR_THREADS, else this process's
    share of the cores. onnxruntime's default is a thread per core in every process, so the 8 ranks
    torchrun starts on a node (LOCAL_WORLD_SIZE) would each spawn one per core and fight over them."""
    source = "threads="
    if threads is None and os.environ.get("FLOWOPD_OCR_THREADS"):
        threads, source = os.environ["FLOWOPD_OCR_THREADS"], "FLOWOPD_OCR_THREADS"
    if threads is None:
        return max(1, _available_cores() // int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    if isinstance(threads, str) and threads.strip().isdigit():
        threads = int(threads)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise SystemExit(f"error: ocr reward: {source} must be a whole number of threads >= 1, got {threads!r}")
    # more threads than cores only oversubscribe them (and rapidocr ignores a count above os.cpu_count(),
    # which would bring back onnxruntime's thread per core)
    return min(threads, _available_cores())


OCR_ENGINES = {  # engine -> (the version this code is written for, the line that installs it)
    "paddleocr": ("2.9.1", "pip install paddlepaddle==2.6.2 paddleocr==2.9.1  (Flow-GRPO's engine; paddlepaddle-gpu on GPUs)"),
    "rapidocr": ("3.10.0", "pip install rapidocr==3.10.0 onnxruntime"),
}


def _installed(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _ocr_model_files(folder):
    """rapidocr's English models in a local folder: one *det*.onnx, one *rec*.onnx and the recogniser's
    character list (*.txt); one error line otherwise."""
    folder = os.path.expanduser(os.fspath(folder))
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    det = [n for n in names if n.endswith(".onnx") and "det" in n]
    rec = [n for n in names if n.endswith(".onnx") and "rec" in n]
    keys = [n for n in names if n.endswith(".txt")]
    if len(det) != 1 or len(rec) != 1 or len(keys) != 1:
        raise SystemExit(f"error: ocr reward: FLOWOPD_OCR_MODELS / models={folder} must be a folder with one *det*.onnx, "
                         f"one *rec*.onnx and one character list *.txt (English PP-OCR models converted to ONNX, e.g. "
                         f"en_PP-OCRv3_det_infer.onnx, en_PP-OCRv4_rec_infer.onnx, en_dict.txt); found {names}")
    return {k: os.path.join(folder, v[0]) for k, v in (("det", det), ("rec", rec), ("keys", keys))}


def ocr_engine(engine=None, models=None):
    """Which OCR engine the ocr reward reads with, its version and its models, without loading anything:
    {"engine", "version", "models"}. engine: 'paddleocr' (Flow-GRPO's: PaddleOCR 2.9.1, English, no angle
    classifier), 'rapidocr' (ONNX, offline), or 'auto' = paddleocr where it is installed, else rapidocr;
    default FLOWOPD_OCR_ENGINE, else auto. models (rapidocr): a folder of English models, default
    FLOWOPD_OCR_MODELS; without one, the wheel's bundled models (Chinese PP-OCRv6 small in 3.10: the tiny
    world's and the CPU tests' engine). Recorded in run configs and evaluation caches."""
    engine = engine or os.environ.get("FLOWOPD_OCR_ENGINE") or "auto"
    if engine == "auto":
        engine = "paddleocr" if _installed("paddleocr") else "rapidocr"
    if engine not in OCR_ENGINES:
        raise SystemExit(f"error: ocr reward: engine {engine!r} (FLOWOPD_OCR_ENGINE or engine=) must be auto, "
                         f"{' or '.join(OCR_ENGINES)}")
    if not _installed(engine):
        raise SystemExit(f"error: ocr reward: engine {engine} is not installed: {OCR_ENGINES[engine][1]}")
    import importlib.metadata

    version = importlib.metadata.version(engine)
    if engine == "paddleocr":
        return dict(engine=engine, version=version, models="PaddleOCR lang=en, use_angle_cls=False")
    models = models or os.environ.get("FLOWOPD_OCR_MODELS")
    files = _ocr_model_files(models) if models else None
    described = ("bundled (Chinese PP-OCRv6 small in 3.10)" if files is None else
                 ", ".join(f"{k}={os.path.basename(v)}" for k, v in files.items()))
    return dict(engine=engine, version=version, models=described, files=files)


class _OcrScorer:
    """Flow-GRPO's OCR rule on the text an OCR engine reads (see ocr_engine): PaddleOCR 2.9.1 in English
    with no angle classifier where it is installed, else rapidocr (English models from a local folder, or
    its bundled ones). threads: the CPU threads of either engine (see _ocr_threads)."""

    ENV = ("FLOWOPD_OCR_THREADS", "LOCAL_WORLD_SIZE", "FLOWOPD_OCR_ENGINE", "FLOWOPD_OCR_MODELS")  # part of the cache key

    def __init__(self, text_score=0.5, threads=None, engine=None, models=None):
        self.text_score = text_score  # rapidocr's (and PaddleOCR's drop_score) confidence cut for a text line
        self.threads = _ocr_threads(threads)
        self.info = ocr_engine(engine, models)
        self.engine = None

    def _load(self):
        if self.info["engine"] == "paddleocr":
            from paddleocr import PaddleOCR

            # Flow-GRPO's flow_grpo/ocr.py: English, no angle classifier, on the CPU, quiet
            self.engine = PaddleOCR(use_angle_cls=False, lang="en", use_gpu=False, show_log=False,
                                    drop_score=self.text_score, cpu_threads=self.threads)

            def read(image):  # [[box, (text, confidence)], ...] per image
                result = self.engine.ocr(image, cls=False)
                lines = result[0] if result and result[0] else []
                return [line[1][0] for line in lines if line[1][1] > 0]

            self.read = read
            return
        from rapidocr import RapidOCR

        # no angle classifier, as Flow-GRPO's PaddleOCR(use_angle_cls=False); quiet logger. onnxruntime's
        # default sequential executor runs one node at a time, so its inter-op pool would only sit idle.
        params = {"Global.log_level": "critical", "Global.use_cls": False, "Global.text_score": self.text_score,
                  "EngineConfig.onnxruntime.intra_op_num_threads": self.threads,
                  "EngineConfig.onnxruntime.inter_op_num_threads": 1}
        files = self.info["files"]
        if files:  # English recognition, as Flow-GRPO's lang="en"
            params.update({"Det.model_path": files["det"], "Rec.model_path": files["rec"],
                           "Rec.rec_keys_path": files["keys"], "Det.lang_type": "en", "Rec.lang_type": "en"})
        self.engine = RapidOCR(params=params)
        self.read = lambda image: list(self.engine(image).txts or [])

    def __call__(self, images, prompts, metadata):
        if self.engine is None:
            self._load()
        from PIL import Image

        for prompt in prompts:  # fail on a prompt without a target before spending time on OCR
            ocr_target(prompt)
        scores = []
        for image, prompt in zip(_to_uint8(images), prompts):
            h, w = image.shape[:2]
            if min(h, w) < OCR_MIN_SIDE:
                s = OCR_UPSAMPLE_TO / min(h, w)
                image = np.asarray(Image.fromarray(image).resize((round(w * s), round(h * s)), Image.BICUBIC))
            text = "".join(self.read(image))  # all lines, reading order
            scores.append(ocr_reward_from_text(text, prompt))
        return scores


# -----------------------------------------------------------------------------
# CLIP scorers: PickScore and the LAION aesthetic predictor


def _torch_dtype(dtype, device):
    if dtype is None:
        return _scorer_dtype(device)
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


class _PickScore:
    """PickScore_v1: logit_scale * cos(image, text) / 26.

    model / processor: a hub id or a local folder; else FLOWOPD_PICKSCORE_MODEL / FLOWOPD_PICKSCORE_PROCESSOR;
    else the hub ids (from the Hugging Face cache when offline). A path (absolute, or starting with . or ~)
    that is no folder fails with one line. device: where the CLIP runs; dtype: its precision (default
    float16 on CUDA, float32 elsewhere; "float32" on CUDA is Flow-GRPO's choice, at twice the memory).
    The cosine and the logit scale stay in float32 either way."""

    ENV = ("FLOWOPD_PICKSCORE_MODEL", "FLOWOPD_PICKSCORE_PROCESSOR")  # read when built: part of the cache key

    def __init__(self, model=None, processor=None, device="cpu", dtype=None):
        self.model_path = os.fspath(model or os.environ.get("FLOWOPD_PICKSCORE_MODEL") or "yuvalkirstain/PickScore_v1")
        self.processor_path = os.fspath(processor or os.environ.get("FLOWOPD_PICKSCORE_PROCESSOR")
                                        or "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
        self.device = torch.device(device)
        self.dtype = _torch_dtype(dtype, self.device)
        self.model = None

    def _load(self):
        from transformers import CLIPModel, CLIPProcessor

        self.processor = _from_pretrained(CLIPProcessor, self.processor_path, "pickscore", "processor",
                                          "FLOWOPD_PICKSCORE_PROCESSOR")
        model = _from_pretrained(CLIPModel, self.model_path, "pickscore", "model", "FLOWOPD_PICKSCORE_MODEL")
        # exp(logit_scale) taken before the cast: float16 would round PickScore's ~100 by up to 0.2 %
        self.logit_scale = model.logit_scale.detach().float().exp().item()
        self.model = model.eval().to(self.device, self.dtype)

    @torch.no_grad()
    def __call__(self, images, prompts, metadata):
        if self.model is None:
            self._load()
        pixels = self.processor(images=_to_pil(images), return_tensors="pt")["pixel_values"]
        text_in = self.processor(text=list(prompts), padding=True, truncation=True, max_length=77,
                                 return_tensors="pt").to(self.device)  # token ids: moved, never cast
        image_emb = _embedding(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))).float()
        text_emb = _embedding(self.model.get_text_features(**text_in)).float()
        image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
        text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
        # the diagonal of PickScore's logits: each image against its own prompt
        return self.logit_scale * (image_emb * text_emb).sum(-1) / PICKSCORE_SCALE


class AestheticMLP(torch.nn.Module):
    """The improved-aesthetic-predictor head (christophschuhmann/improved-aesthetic-predictor);
    attribute and layer names match its released sac+logos+ava1-l14-linearMSE.pth."""

    def __init__(self, input_size=768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embed):
        return self.layers(embed)


def load_state(path):
    """A state dict from .safetensors or a torch .pth/.pt file."""
    if not os.path.exists(path):
        raise RuntimeError(f"aesthetic reward: no MLP weights at '{path}': "
                           "pass mlp=/path/to/sac+logos+ava1-l14-linearMSE.pth or set FLOWOPD_AESTHETIC_MLP")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


class _Aesthetic:
    """The LAION improved-aesthetic predictor: its MLP on unit CLIP ViT-L/14 image embeddings.

    clip: a hub id or a local folder, else FLOWOPD_AESTHETIC_CLIP, else openai/clip-vit-large-patch14 (from
    the Hugging Face cache when offline). mlp: the predictor's weights (.pth or .safetensors), else
    FLOWOPD_AESTHETIC_MLP. device / dtype: as PickScore's (float16 CLIP on CUDA); the MLP, a few MB whose
    output is the score itself, runs in float32."""

    ENV = ("FLOWOPD_AESTHETIC_CLIP", "FLOWOPD_AESTHETIC_MLP")  # read when built: part of the cache key

    def __init__(self, clip=None, mlp=None, device="cpu", dtype=None):
        self.clip_path = os.fspath(clip or os.environ.get("FLOWOPD_AESTHETIC_CLIP") or "openai/clip-vit-large-patch14")
        self.mlp_path = mlp or os.environ.get("FLOWOPD_AESTHETIC_MLP")
        self.device = torch.device(device)
        self.dtype = _torch_dtype(dtype, self.device)
        self.model = None

    def _load(self):
        from transformers import CLIPImageProcessor, CLIPModel

        if self.mlp_path is None:
            raise RuntimeError("aesthetic reward: pass mlp=/path/to/sac+logos+ava1-l14-linearMSE.pth "
                               "(or set FLOWOPD_AESTHETIC_MLP)")
        state = load_state(os.fspath(self.mlp_path))
        self.mlp = AestheticMLP(state["layers.0.weight"].shape[1])
        self.mlp.load_state_dict(state)
        self.mlp.eval().to(self.device, torch.float32)
        where = (self.clip_path, "aesthetic", "clip", "FLOWOPD_AESTHETIC_CLIP")
        self.processor = _from_pretrained(CLIPImageProcessor, *where)
        self.model = _from_pretrained(CLIPModel, *where).eval().to(self.device, self.dtype)

    @torch.no_grad()
    def __call__(self, images, prompts, metadata):
        if self.model is None:
            self._load()
        pixels = self.processor(images=_to_pil(images), return_tensors="pt")["pixel_values"]
        embed = _embedding(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))).float()
        embed = embed / embed.norm(dim=-1, keepdim=True)  # the predictor was trained on unit embeddings
        return self.mlp(embed).squeeze(-1)


# -----------------------------------------------------------------------------
# The paper's other quality scorers (evaluation only, optional packages): ImageReward and HPS-v2.1.
# Both are checked when built (the package, and the local weights where a folder or file is named), so a table
# that asks for one without it stops at set-up with one line, before any image is sampled.


def _local_weights(path, env, reward, what, files, fetch):
    """A scorer's local weights: `path`, else $env, else None (the package downloads them). A given path must
    hold `files` (("",): the path is the file itself), else one error line with the command that fetches them."""
    path = path or os.environ.get(env)
    if path is None:
        return None
    path = os.path.expanduser(os.fspath(path))
    missing = [n for n in files if not os.path.isfile(os.path.join(path, n) if n else path)]
    if missing:
        lacks = "is no file" if files == ("",) else f"lacks {', '.join(missing)}"
        raise SystemExit(f"error: {reward} reward: {env} / {what}={path} {lacks}: "
                         f"{fetch} {'DIR' if files == ('',) else path}")
    return path


def _require(module, reward, install):
    if not _installed(module):
        raise SystemExit(f"error: {reward} reward: package {module} is not installed: {install}")


class _ImageReward:
    """ImageReward-v1.0 (THUDM, a BLIP fine-tune on human preference; image-reward's RM.load and score).

    folder: a local folder with ImageReward.pt and med_config.json (its download_root), else
    FLOWOPD_IMAGEREWARD_DIR, else the package downloads both to ~/.cache/ImageReward. BLIP's text side
    also reads bert-base-uncased's tokenizer from the Hugging Face cache. Runs in float32 on `device`."""

    ENV = ("FLOWOPD_IMAGEREWARD_DIR",)  # read when built: part of the cache key
    INSTALL = "pip install image-reward  (ImageReward-v1.0; weights: hf download THUDM/ImageReward --local-dir DIR)"

    def __init__(self, folder=None, device="cpu", dtype=None):
        _require("ImageReward", "imagereward", self.INSTALL)
        self.folder = _local_weights(folder, "FLOWOPD_IMAGEREWARD_DIR", "imagereward", "folder",
                                     ("ImageReward.pt", "med_config.json"), "hf download THUDM/ImageReward --local-dir")
        self.device = torch.device(device)
        self.model = None

    def _load(self):
        import ImageReward as RM

        name = os.path.join(self.folder, "ImageReward.pt") if self.folder else "ImageReward-v1.0"
        self.model = RM.load(name, device=str(self.device), download_root=self.folder).eval()

    @torch.no_grad()
    def __call__(self, images, prompts, metadata):
        if self.model is None:
            self._load()
        # one image per call, as Flow-GRPO's scorer (inference_rank(prompt, [image])): ImageReward pads per prompt
        return [float(self.model.score(prompt, image)) for prompt, image in zip(prompts, _to_pil(images))]


class _HPSv2:
    """HPS-v2.1 (tgxs002/HPSv2: an OpenCLIP ViT-H-14 fine-tune): the cosine of image and prompt features,
    as the package's img_score.

    checkpoint: HPS_v2.1_compressed.pt, else FLOWOPD_HPSV2_CHECKPOINT, else the package's download from
    xswu/HPSv2. The ViT-H-14 is built without pretrained weights (the checkpoint holds them all), so
    nothing else is fetched. device: where it runs; autocast float16 on CUDA (the package's 'amp')
    unless dtype is float32."""

    ENV = ("FLOWOPD_HPSV2_CHECKPOINT",)  # read when built: part of the cache key
    INSTALL = "pip install hpsv2  (HPS-v2.1; weights: hf download xswu/HPSv2 HPS_v2.1_compressed.pt --local-dir DIR)"

    def __init__(self, checkpoint=None, device="cpu", dtype=None):
        _require("hpsv2", "hpsv2", self.INSTALL)
        self.checkpoint = _local_weights(checkpoint, "FLOWOPD_HPSV2_CHECKPOINT", "hpsv2", "checkpoint", ("",),
                                         "hf download xswu/HPSv2 HPS_v2.1_compressed.pt --local-dir")
        self.device = torch.device(device)
        self.dtype = _torch_dtype(dtype, self.device)
        self.model = None

    def _load(self):
        from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer

        path = self.checkpoint
        if path is None:
            import huggingface_hub

            path = huggingface_hub.hf_hub_download("xswu/HPSv2", "HPS_v2.1_compressed.pt")
        model, _, self.preprocess = create_model_and_transforms("ViT-H-14", None, precision="fp32", device="cpu",
                                                                jit=False, output_dict=True)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["state_dict"])
        self.model = model.eval().to(self.device)
        self.tokenizer = get_tokenizer("ViT-H-14")

    @torch.no_grad()
    def __call__(self, images, prompts, metadata):
        if self.model is None:
            self._load()
        pixels = torch.stack([self.preprocess(image) for image in _to_pil(images)]).to(self.device)
        text = self.tokenizer(list(prompts)).to(self.device)
        amp = self.device.type == "cuda" and self.dtype == torch.float16
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            out = self.model(pixels, text)
        # the features come normalised (OpenCLIP's output_dict); the diagonal: each image against its own prompt
        return (out["image_features"].float() * out["text_features"].float()).sum(-1)


# -----------------------------------------------------------------------------
# reward-server clients (GenEval, DeQA)
# Protocol of yifan123/reward-server (the servers Flow-GRPO's geneval_score / deqa_score_remote call):
# POST to "/" a pickled dict whose "images" are JPEG bytes (PIL default quality), plus for GenEval
# "meta_datas" (the prompt's GenEval metadata dicts) and "only_strict"; the 200 reply is a pickled
# dict, a 500 reply the server's traceback as text. Pickle is the protocol, and pickle.loads calls whatever
# the reply names (anyone answering at the URL could run code in the training job), so replies are read
# by _PlainUnpickler: plain data only. Requests that fail in passing (no connection, a dropped one, a 5xx)
# are retried (RETRY_ATTEMPTS); one that times out is not: the server is still working on it.

RETRY_ATTEMPTS = 4  # a restarting server or a dropped connection usually recovers within seconds ...
RETRY_DELAY = 0.5   # ... so wait 0.5 s, 1 s, 2 s between attempts (tests set this to 0)
REMOTE_TIMEOUT = 120.0  # seconds a server may stay silent on one batch (FLOWOPD_REWARD_TIMEOUT), as Flow-GRPO's

# The servers reply with lists of Python floats (plain opcodes, no globals); a fork built on numpy may send
# numpy arrays or scalars, which pickle through exactly these globals. numpy 2 renamed numpy.core to
# numpy._core, so a server on either major version may name them under either path. The live objects are
# taken from what numpy itself pickles with, never imported by name (find_class's default imports any
# module the reply names).
_reconstruct, _scalar = np.zeros(0).__reduce__()[0], np.float64(0).__reduce__()[0]
_NUMPY_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
}
_PLAIN_DATA = "dicts, lists, tuples, numbers, strings, bytes, booleans, None, numpy arrays and scalars"


class _PlainUnpickler(pickle.Unpickler):
    """Plain containers and literals need no globals; admit numpy's and refuse every other one, so no
    callable the server names ever runs here."""

    def __init__(self, body, where):
        super().__init__(io.BytesIO(body))
        self.where = where

    def find_class(self, module, name):
        if (module, name) in _NUMPY_GLOBALS:
            return _NUMPY_GLOBALS[(module, name)]
        # SystemExit, not an Exception: no caller's `except Exception` may swallow it and carry on
        raise SystemExit(f"error: {self.where} sent a reply naming the global '{module}.{name}'; "
                         f"expected plain data ({_PLAIN_DATA}): refused to unpickle it")


def _plain_loads(body, where):
    try:
        return _PlainUnpickler(body, where).load()
    except Exception as e:  # garbage makes the unpickler fail in many ways (EOFError, UnpicklingError, ...)
        detail = (str(e).splitlines() or [""])[0]
        raise SystemExit(f"error: {where} sent a reply that is not a pickle of plain data "
                         f"({type(e).__name__}: {detail}); expected {_PLAIN_DATA}") from None


class _Transient(Exception):
    """A failure that may pass (connection refused or reset, HTTP 5xx): worth another attempt."""


def _jpeg_bytes(images):
    out = []
    for image in _to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG")
        out.append(buffer.getvalue())
    return out


class _RemoteScorer:
    """timeout: seconds the server may stay silent on one batch, else FLOWOPD_REWARD_TIMEOUT, else 120."""

    def __init__(self, kind, url=None, host=None, port=None, timeout=None, batch_size=REMOTE_BATCH):
        env, default = DEFAULT_URLS[kind]
        if host is not None or port is not None:
            url = f"http://{host or '127.0.0.1'}:{port or default.rsplit(':', 1)[1]}"
        self.kind, self.url = kind, url or os.environ.get(env) or default
        if timeout is None:
            timeout = os.environ.get("FLOWOPD_REWARD_TIMEOUT") or REMOTE_TIMEOUT
        try:
            self.timeout = float(timeout)
        except ValueError:
            self.timeout = float("nan")
        if not self.timeout > 0:
            raise SystemExit(f"error: {kind} reward: the timeout must be a number of seconds > 0 (timeout=... or "
                             f"FLOWOPD_REWARD_TIMEOUT), got {timeout!r}")
        self.batch_size = batch_size

    def post(self, payload):
        """Send one batch; return the reply parsed as plain data. Transient failures are retried with
        exponential backoff; a 4xx or an unreadable reply will not change on retry, so it fails at once,
        and so does a timeout (see _send)."""
        data, n_images = pickle.dumps(payload), len(payload["images"])
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            try:
                return _plain_loads(self._send(data, n_images), f"{self.kind} reward server at {self.url}")
            except _Transient as e:
                if attempt == RETRY_ATTEMPTS:
                    raise RuntimeError(f"{e} [{RETRY_ATTEMPTS} attempts]") from None
                time.sleep(RETRY_DELAY * 2 ** (attempt - 1))

    def _send(self, data, n_images):
        request = urllib.request.Request(self.url, data=data, method="POST",
                                         headers={"Content-Type": "application/octet-stream"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as e:  # the server sends its traceback: show its last line
            lines = e.read().decode("utf-8", "replace").strip().splitlines() or [str(e)]
            failure = f"{self.kind} reward server at {self.url} failed (HTTP {e.code}): {lines[-1]}"
            if e.code < 500:  # the request itself is wrong: sending it again cannot help
                raise RuntimeError(failure) from None
            raise _Transient(failure) from None
        except TimeoutError:
            # urllib wraps what fails while connecting and sending in a URLError (below), so a bare timeout
            # comes after the whole request went out: the server has the batch and is busy with it (a
            # queue of 8 ranks x nodes). Sending it again would queue a second copy behind the first.
            raise SystemExit(
                f"error: {self.kind} reward server at {self.url} sent no answer to a batch of {n_images} images "
                f"within the {self.timeout:g} s timeout; not resent, as it may still be working on it: raise the "
                f"timeout (FLOWOPD_REWARD_TIMEOUT=<seconds> or timeout=...) or send smaller batches (batch_size=...)"
            ) from None
        except (urllib.error.URLError, ConnectionError) as e:  # no connection, or it dropped: retried
            reason = getattr(e, "reason", e)
            raise _Transient(f"{self.kind} reward server unreachable at {self.url} ({reason}): start it "
                             f"(yifan123/reward-server) or pass url=... / set {DEFAULT_URLS[self.kind][0]}") from None

    def batches(self, n):
        return [slice(i, i + self.batch_size) for i in range(0, n, self.batch_size)]


class _GenEval(_RemoteScorer):
    """Returns one field of the server's reply: "scores" (default: the partial-credit reward Flow-GRPO
    trains on), "strict_rewards" (1 if every clause holds with exact counts) or "rewards" (GenEval's
    own correctness, counts >= required; the server computes it only when only_strict is False)."""

    FIELDS = ("scores", "strict_rewards", "rewards")

    def __init__(self, field="scores", **kw):
        super().__init__("geneval", **kw)
        if field not in self.FIELDS:
            raise ValueError(f"geneval field must be one of {self.FIELDS}, got {field!r}")
        self.field = field

    def fields(self, images, metadata, names):
        """{name: list of per-image values} of several reply fields, from one request per batch (evaluate.py's
        GenEval correctness and strict correctness)."""
        if metadata is None or len(metadata) != len(images):
            raise ValueError("geneval reward needs one GenEval metadata dict per image (tag, include, ...)")
        out = {name: [] for name in names}
        for s in self.batches(len(images)):
            payload = {"images": _jpeg_bytes(images[s]), "meta_datas": list(metadata[s]),
                       "only_strict": "rewards" not in names}
            reply = self.post(payload)
            for name in names:
                out[name] += [float(x) for x in reply[name]]
        return out

    def __call__(self, images, prompts, metadata):
        return self.fields(images, metadata, (self.field,))[self.field]


class _DeQA(_RemoteScorer):
    """Returns the server's "outputs" times `scale`. Meant for a server that answers on DeQA's 1-5
    scale (the evaluation divides by 5). NOTE: yifan123/reward-server's deqa.py already divides by 5
    (answers in [0.2, 1]); against that server pass scale=5 to get the 1-5 score."""

    def __init__(self, scale=1.0, **kw):
        super().__init__("deqa", **kw)
        self.scale = scale

    def __call__(self, images, prompts, metadata):
        scores = []
        for s in self.batches(len(images)):
            scores += list(self.post({"images": _jpeg_bytes(images[s])})["outputs"])
        return [self.scale * float(x) for x in scores]


# -----------------------------------------------------------------------------
# the registry

_SD3_SCORERS = {
    "ocr": _OcrScorer,
    "pickscore": _PickScore,
    "aesthetic": _Aesthetic,
    "imagereward": _ImageReward,
    "hpsv2": _HPSv2,
    "geneval": _GenEval,
    "deqa": _DeQA,
}
_CACHE = {}  # (name, options) -> model-backed scorer, so every caller shares one loaded model


def _tiny_scorer(name, field="scores"):
    """field (geneval only), as the sd3 client: "scores" = partial credit (training), "strict_rewards" =
    every clause holds (evaluation)."""
    if field not in ("scores", "strict_rewards"):
        raise ValueError(f"tiny geneval field must be 'scores' or 'strict_rewards', got {field!r}")

    def score(images, prompts, metadata):
        import tiny_world  # lazily: rewards.py must import without the tiny world

        if name == "objects":
            return tiny_world.objects_drawn(images, prompts)
        return tiny_world.score(name, images, prompts, strict=field == "strict_rewards")

    return score


# the sd3 scorers that take a device; OCR and the HTTP clients ignore it
_ON_DEVICE = ("pickscore", "aesthetic", "imagereward", "hpsv2")


def get_reward(name: str, world: str = "sd3", device=None, **options):
    """A reward function fn(images (B,3,H,W) in [0,1], prompts, metadata=None) -> float32 (B,) on CPU.
    device: where a model-backed scorer (pickscore, aesthetic) runs, in float16 on CUDA; None = the CPU.
    The other rewards ignore it, so a stage may pass its device to every reward. fn.scorer is the scorer."""
    if world == "tiny":
        if name not in TINY_REWARDS + TINY_METRICS:
            raise ValueError(f"unknown reward {name!r} for world 'tiny'; known: "
                             f"{', '.join(TINY_REWARDS + TINY_METRICS)}")
        if set(options) - ({"field"} if name == "geneval" else set()):
            raise ValueError(f"tiny-world reward {name!r} takes {'only field' if name == 'geneval' else 'no options'}, "
                             f"got {sorted(options)}")
        scorer = _tiny_scorer(name, **options)
    elif world == "sd3":
        if name not in _SD3_SCORERS:
            raise ValueError(f"unknown reward {name!r} for world 'sd3'; known: {', '.join(SD3_REWARDS)}")
        cls = _SD3_SCORERS[name]
        if name in _ON_DEVICE and device is not None:
            options = dict(options, device=_resolve_device(device))
        if name in ("geneval", "deqa"):  # HTTP clients hold no model: a fresh one reads the env now
            scorer = cls(**options)
        else:  # a scorer reads its environment variables when built: another value, another scorer
            key = (name, repr(sorted(options.items())), tuple(os.environ.get(v) for v in cls.ENV))
            if key not in _CACHE:
                _CACHE[key] = cls(**options)  # cheap: the model loads on the first call
            scorer = _CACHE[key]
    else:
        raise ValueError(f"unknown world {world!r}; known: tiny, sd3")

    def reward(images, prompts, metadata=None):
        assert images.ndim == 4 and images.shape[1] == 3, f"images must be (B,3,H,W), got {tuple(images.shape)}"
        assert len(prompts) == len(images), f"{len(prompts)} prompts for {len(images)} images"
        scores = scorer(images, list(prompts), metadata)  # a list, an array or a tensor on any device
        if torch.is_tensor(scores):
            return scores.detach().float().cpu().reshape(len(images))
        return torch.as_tensor(np.asarray(scores, dtype=np.float32)).reshape(len(images))

    reward.name, reward.scorer = name, scorer
    return reward


def parse_weights(spec: str) -> dict:
    """'geneval:3,ocr:1,pickscore' -> {'geneval': 3.0, 'ocr': 1.0, 'pickscore': 1.0} (weight 1 if omitted)."""
    weights = {}
    for part in spec.split(","):
        name, sep, weight = part.strip().partition(":")
        name = name.strip()
        try:
            value = float(weight) if sep else 1.0
        except ValueError:
            value = None
        if not name or value is None or not np.isfinite(value) or name in weights:
            raise ValueError(f"bad reward spec part {part!r} in {spec!r}: expected name[:weight], each name once")
        weights[name] = value
    return weights


def combined_reward(spec: str, world: str = "sd3", device=None, **options):
    """Weighted sum of rewards, e.g. 'pickscore:1,deqa:0.2'. Options are per reward name:
    combined_reward('ocr,pickscore', 'sd3', device, pickscore=dict(model=path)); device as get_reward's.
    Returns fn(images, prompts, metadata=None) -> (total (B,), {name: unweighted (B,)})."""
    weights = parse_weights(spec)
    stray = set(options) - set(weights)
    if stray:
        raise ValueError(f"options for rewards not in {spec!r}: {sorted(stray)}")
    fns = {name: get_reward(name, world, device, **options.get(name, {})) for name in weights}

    def reward(images, prompts, metadata=None):
        parts = {name: fn(images, prompts, metadata) for name, fn in fns.items()}
        total = sum(weights[name] * parts[name] for name in parts)
        return total, parts

    reward.scorers = [getattr(fn, "scorer", None) for fn in fns.values()]  # for load_scorers; a plain function has none
    return reward


def paper_average(geneval, ocr, deqa, pickscore) -> float:
    """The Average column of the paper's main table: each metric brought to about [0, 1] first."""
    return float(np.mean([geneval, ocr, deqa / DEQA_MAX, pickscore / PICKSCORE_SCALE]))


def score_by_task(reward_fns, images, prompts, metadata, tasks):
    """Score a mixed batch: sample i gets reward_fns[tasks[i]], each task's samples scored in one call.
    NaN where a sample's task has no reward function. Returns float32 (B,)."""
    scores = torch.full((len(images),), float("nan"))
    for task, fn in reward_fns.items():
        rows = [i for i, t in enumerate(tasks) if t == task]
        if rows:
            meta = [metadata[i] for i in rows] if metadata is not None else None
            scores[rows] = fn(images[rows], [prompts[i] for i in rows], meta)
    return scores


# -----------------------------------------------------------------------------
# scoring in the background: Flow-GRPO scores batch k while it samples batch k+1

_WORKER = None  # the queue of the one thread every BatchScorer shares, started on first use


def _worker():
    """A daemon thread, not a ThreadPoolExecutor's: the interpreter joins an executor's threads at exit, so a
    run stopping on an error would first wait for an in-flight reward-server request (up to its timeout)."""
    global _WORKER
    if _WORKER is None:
        jobs = queue.SimpleQueue()

        def serve():
            while True:
                future, fn, args = jobs.get()
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args))
                    except BaseException as e:  # SystemExit included: raised again by result() on the caller's thread
                        future.set_exception(e)

        threading.Thread(target=serve, name="rewards", daemon=True).start()
        _WORKER = jobs
    return _WORKER


def load_scorers(*reward_fns):
    """Load the models behind these reward functions (get_reward's or combined_reward's; None is skipped) now, on
    the calling thread: a stage calls it before its loop, so that no from_pretrained runs on the scoring thread
    while the main thread samples (what a concurrent load changes in process-wide state is then no question)."""
    for fn in reward_fns:
        for scorer in getattr(fn, "scorers", [getattr(fn, "scorer", None)]):
            # the lazy scorers mark "not loaded yet" with engine / model None (OCR / the CLIP scorers)
            if hasattr(scorer, "_load") and any(getattr(scorer, a, "") is None for a in ("engine", "model")):
                scorer._load()


class BatchScorer:
    """Scores each sampled batch on a background thread while the caller samples the next one.

        scorer = BatchScorer(task_reward)                  # {task: reward fn} (routed by tasks), or one reward fn
        for each batch: scorer.submit(images, prompts, metadata, tasks)   # returns at once
        scores = scorer.result()                           # float32 (N,) on CPU, in submission order

    The values are those of one call on all the batches at once: every scorer here scores each image on
    its own (a CLIP scorer's batched matrix products may round the last bit differently). One thread
    serves every BatchScorer, a batch at a time in submission order: the scorers load their models
    lazily and are not thread-safe. What overlaps sampling is the scoring's CPU and network
    time (PIL conversion, OCR, the reward servers); a CUDA scorer's kernels go to the same default stream
    as the sampler's, so on the GPU they take turns. The images are read later: do not write into them."""

    def __init__(self, reward_fn):
        self.reward_fn = reward_fn
        self.futures = []

    def submit(self, images, prompts, metadata=None, tasks=None):
        """Queue one batch; returns its concurrent.futures.Future (the batch's float32 (B,) scores)."""
        routed = isinstance(self.reward_fn, dict)
        if routed != (tasks is not None):
            raise ValueError("BatchScorer: pass tasks with a {task: reward fn} dict, and only then")
        # copies: the caller may reuse its lists for the next batch
        metadata, tasks = [None if xs is None else list(xs) for xs in (metadata, tasks)]
        future = concurrent.futures.Future()
        _worker().put((future, self._score, (images, list(prompts), metadata, tasks)))
        self.futures.append(future)
        return future

    def _score(self, images, prompts, metadata, tasks):
        if tasks is not None:
            scores = score_by_task(self.reward_fn, images, prompts, metadata, tasks)
        else:
            scores = self.reward_fn(images, prompts, metadata)
        scores = torch.as_tensor(scores).detach().float().cpu().reshape(-1)
        assert len(scores) == len(images), f"{len(scores)} scores for {len(images)} images"
        return scores

    def result(self):
        """Wait for every batch submitted since the last result(); their scores concatenated, float32 (N,) on
        CPU. A scorer's exception is raised here (the first batch's, in order); the batches queued behind
        it are dropped, and the scorer is empty again either way."""
        futures, self.futures = self.futures, []
        try:
            scores = [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()  # those not started yet: their scores would be thrown away
            raise
        return torch.cat(scores) if scores else torch.zeros(0)


# -----------------------------------------------------------------------------
# evaluation-only metrics (OOD, diversity)


def ood_scores(images, prompts, world="tiny"):
    """Per-category OOD scores {category: mean} (the T2I-CompBench analogue). The tiny world scores its
    held-out compositions; for SD3 use T2I-CompBench's own evaluators (not shipped here)."""
    if world != "tiny":
        raise ValueError("OOD scores are only built in for the tiny world; run T2I-CompBench's evaluators for sd3")
    import tiny_world

    return tiny_world.score_ood(images, prompts)


def diversity(images, prompts, world="tiny"):
    """Within-prompt diversity of a batch holding several images per prompt (higher = more varied)."""
    if world != "tiny":
        raise ValueError("the diversity metric is only built in for the tiny world")
    import tiny_world

    return float(tiny_world.diversity(images, prompts))
