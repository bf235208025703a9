"""
Tests of rewards.py. Every real (sd3-world) scorer runs its actual code path offline:
OCR with rapidocr's bundled models on rendered text, PickScore and the aesthetic predictor on a
tiny random CLIP saved to disk and loaded through from_pretrained, and the GenEval/DeQA clients
against a stub reward server on 127.0.0.1.
"""

import io
import pickle
import socket
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for rewards and tests.*
import rewards  # noqa: E402
from stub_reward_server import serve  # noqa: E402
from rewards import (  # noqa: E402
    combined_reward, get_reward, levenshtein, ocr_reward_from_text, paper_average, parse_weights,
)

# -----------------------------------------------------------------------------
# registry, weights, the paper's Average


def test_parse_weights():
    assert parse_weights("geneval:3,ocr:1,pickscore") == {"geneval": 3.0, "ocr": 1.0, "pickscore": 1.0}
    assert parse_weights(" pickscore : 1 , deqa:0.2 ") == {"pickscore": 1.0, "deqa": 0.2}
    for bad, part in [("geneval:x", "geneval:x"), ("ocr,,deqa", "''"), ("ocr:1,ocr:2", "ocr:2"), (":3", ":3")]:
        with pytest.raises(ValueError, match=part):
            parse_weights(bad)


def test_paper_average_reproduces_table():
    # rows of the paper's main table: (GenEval, OCR, DeQA, PickScore) -> Average
    assert round(paper_average(0.63, 0.59, 4.07, 21.64), 2) == 0.72
    assert round(paper_average(0.92, 0.94, 4.35, 23.08), 2) == 0.90
    assert round(paper_average(0.73, 0.83, 4.33, 21.84), 2) == 0.82


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="geneval, ocr, deqa, pickscore"):
        get_reward("aesthetic", world="tiny")
    with pytest.raises(ValueError, match="aesthetic"):
        get_reward("qwenvl", world="sd3")  # the paper's VLM judge: not wired
    with pytest.raises(ValueError, match="world"):
        get_reward("ocr", world="flux")


def test_tiny_world_wrapper_and_combined(monkeypatch):
    # a stand-in tiny_world: the wrapper's job is routing, shape and dtype, not the scores themselves
    calls = []

    def score(task, images, prompts, strict=True):
        calls.append((task, strict))
        base = {"geneval": 0.1, "ocr": 0.2, "deqa": 0.3, "pickscore": 0.4}[task]
        return np.arange(len(prompts), dtype=np.float64) + base + (strict and task == "geneval")

    monkeypatch.setitem(sys.modules, "tiny_world", types.SimpleNamespace(score=score, TASKS=rewards.TINY_REWARDS))
    images, prompts = torch.rand(3, 3, 8, 8), ["a", "b", "c"]
    r = get_reward("ocr", world="tiny")(images, prompts)
    assert r.dtype == torch.float32 and r.shape == (3,) and calls == [("ocr", False)]
    assert torch.allclose(r, torch.tensor([0.2, 1.2, 2.2]))
    # geneval: partial credit by default (training), strict on request (evaluation); no other options
    get_reward("geneval", world="tiny", field="strict_rewards")(images, prompts)
    assert calls[-1] == ("geneval", True)
    with pytest.raises(ValueError, match="field"):
        get_reward("geneval", world="tiny", field="rewards")
    with pytest.raises(ValueError, match="no options"):
        get_reward("ocr", world="tiny", field="scores")

    total, parts = combined_reward("geneval:3,pickscore", "tiny")(images, prompts, None)
    assert set(parts) == {"geneval", "pickscore"}
    assert torch.allclose(total, 3 * parts["geneval"] + parts["pickscore"])
    assert torch.allclose(parts["geneval"], torch.tensor([0.1, 1.1, 2.1]))
    with pytest.raises(ValueError, match="ocr"):
        combined_reward("geneval", "tiny", ocr={})


def test_tiny_objects_metric_is_the_share_of_named_objects_drawn():
    """evaluate.py's quality column 'objects' (issue #38): get_reward('objects', 'tiny') is tiny_world.objects_drawn,
    1 on the rendered ground truth of the deqa test prompts and 0.5 where each scene's second object is left out.
    An evaluation metric, not a task: the main table's columns stay the four rewards."""
    import tiny_world as tw

    prompts = tw.read_prompts("deqa", "test")[:16]
    objects = get_reward("objects", "tiny")
    truth = tw.render_batch(prompts, np.random.default_rng(0))
    assert torch.equal(objects(truth, prompts), torch.ones(16))
    one = tw.render_batch([tw._one_object_prompt(tw.parse(p)) for p in prompts], np.random.default_rng(0))
    assert torch.equal(objects(one, prompts), torch.full((16,), 0.5))
    with pytest.raises(ValueError, match="scene prompts"):
        objects(truth[:1], tw.read_prompts("ocr", "test")[:1])
    assert "objects" not in rewards.TINY_REWARDS


# -----------------------------------------------------------------------------
# OCR


def test_the_sd3_ocr_rule_needs_no_scipy():
    """rewards.levenshtein takes the tiny world's edit distance; importing it must not need scipy, which the SD3
    path does not install (the tiny world imports scipy where its image maths runs)."""
    import subprocess

    code = "import sys; sys.modules['scipy'] = None; import rewards; print(rewards.levenshtein('kitten', 'sitting'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=str(Path(rewards.__file__).parent), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "3", result.stderr[-2000:]


def test_ocr_rule_by_hand():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3 and levenshtein("ab", "ab") == 0
    prompt = 'a neon sign that says "Hello World" at night'
    assert ocr_reward_from_text("HELLO world", prompt) == 1.0            # case and spaces ignored
    assert ocr_reward_from_text("Open: hello world!! 24h", prompt) == 1.0  # target as a substring
    assert ocr_reward_from_text("helo world", prompt) == pytest.approx(0.9)  # 1 edit over 10 chars
    assert ocr_reward_from_text("hello worlds", prompt) == 1.0           # still contains the target
    assert ocr_reward_from_text("hallo wurld", prompt) == pytest.approx(0.8)
    assert ocr_reward_from_text("", prompt) == 0.0
    assert ocr_reward_from_text("z" * 40, prompt) == 0.0                 # capped at len(target), never < 0
    assert ocr_reward_from_text("ab", 'say "ab" then "cd"') == 1.0       # the first quotes only
    assert ocr_reward_from_text("cd", 'say "ab" then "cd"') == 0.0
    for bad in ["a sign with no quotes", 'one " quote', 'empty "  " quotes']:
        with pytest.raises(ValueError, match="quotes"):
            ocr_reward_from_text("x", bad)


def _render(text, size=512, font_size=64):
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (size, size), "white")
    if text:
        font = ImageFont.load_default(size=font_size)
        ImageDraw.Draw(image).text((size // 12, size // 2 - font_size // 2), text, fill="black", font=font)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255  # (3,H,W) in [0,1]


def test_ocr_engine_on_rendered_text():
    pytest.importorskip("rapidocr")
    prompt = 'a shop sign that says "OPEN LATE"'
    images = torch.stack([_render("OPEN LATE"), _render("CLOSED"), _render("")])
    r = get_reward("ocr", world="sd3")(images, [prompt] * 3)
    assert r.shape == (3,) and r.dtype == torch.float32
    assert r[0] == 1.0, r
    assert r[1] < 0.5, r
    assert r[2] == 0.0, r
    # a small image (the tiny pipeline's size) takes the upsampling path and still reads correctly
    small = torch.nn.functional.interpolate(_render("OPEN LATE")[None], size=(64, 64), mode="bilinear",
                                            antialias=True)
    assert get_reward("ocr")(small, [prompt])[0] == 1.0
    with pytest.raises(ValueError, match="no quotes"):
        get_reward("ocr")(images[:1], ["no quotes here"])


class FakeRapidOCR:
    """Records the params rapidocr is built with; reads no text."""

    built = []

    def __init__(self, params=None):
        self.built.append(params)

    def __call__(self, image):
        return types.SimpleNamespace(txts=None)


@pytest.mark.parametrize("cores, local_world, env, option, expected", [
    (16, "8", None, None, 2),   # torchrun's 8 ranks on a node share its cores
    (16, None, None, None, 16),  # one process: all of them
    (4, "8", None, None, 1),    # more ranks than cores: still one
    (16, "8", "3", None, 3),    # FLOWOPD_OCR_THREADS ...
    (16, "8", "3", 1, 1),       # ... and the option, which wins
    (16, "8", None, 64, 16),    # never more than the cores
])
def test_ocr_threads_per_rank(monkeypatch, cores, local_world, env, option, expected):
    rapidocr = pytest.importorskip("rapidocr")
    monkeypatch.setattr(rapidocr, "RapidOCR", FakeRapidOCR)
    monkeypatch.setattr(rewards, "_CACHE", {})  # no fake engine may stay cached for the other tests
    monkeypatch.setattr(rewards, "_available_cores", lambda: cores)
    for name, value in [("LOCAL_WORLD_SIZE", local_world), ("FLOWOPD_OCR_THREADS", env)]:
        monkeypatch.delenv(name, raising=False) if value is None else monkeypatch.setenv(name, value)
    FakeRapidOCR.built.clear()
    options = {} if option is None else dict(threads=option)
    get_reward("ocr", "sd3", **options)(torch.ones(1, 3, 256, 256), ['say "hi"'])
    [params] = FakeRapidOCR.built
    assert params["EngineConfig.onnxruntime.intra_op_num_threads"] == expected
    assert params["EngineConfig.onnxruntime.inter_op_num_threads"] == 1
    assert params["Global.use_cls"] is False  # the rest as before


def test_ocr_threads_reach_onnxruntime(monkeypatch):
    """The keys are rapidocr 3's own (an unknown key would be stored and ignored): the detector's
    onnxruntime session is built with the thread count (its default, 0, means a thread per core)."""
    pytest.importorskip("rapidocr")
    monkeypatch.setattr(rewards, "_CACHE", {})
    monkeypatch.setattr(rewards, "_available_cores", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.delenv("FLOWOPD_OCR_THREADS", raising=False)
    reward = get_reward("ocr", "sd3")
    assert reward(torch.ones(1, 3, 256, 256), ['say "hi"'])[0] == 0.0  # a blank page: the detector runs alone
    options = reward.scorer.engine.text_det.session.session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)


def test_bad_ocr_threads_is_one_error(monkeypatch):
    monkeypatch.setenv("FLOWOPD_OCR_THREADS", "all")
    with pytest.raises(SystemExit, match="FLOWOPD_OCR_THREADS must be a whole number of threads >= 1, got 'all'"):
        get_reward("ocr", "sd3")
    with pytest.raises(SystemExit, match="threads= must be"):
        get_reward("ocr", "sd3", threads=0)


# -----------------------------------------------------------------------------
# PickScore and aesthetic on a tiny random CLIP


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from tests.sd3_tiny import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=2)
    # a logit scale far from CLIP's init (2.6592) so that a missing or doubled exp() is caught
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16, logit_scale_init_value=3.0)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    path = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _reference_embeddings(path, images, prompts=None):
    """Image (and text) embeddings computed by hand from the model's parts, not get_*_features."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    pil = rewards._to_pil(images)
    with torch.no_grad():
        pixels = processor(images=pil, return_tensors="pt")["pixel_values"]
        image_emb = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text_emb = None
        if prompts is not None:
            tok = processor(text=prompts, padding=True, return_tensors="pt")
            text_emb = model.text_projection(
                model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output)
    return model, image_emb, text_emb


def test_pickscore_formula(tiny_clip_dir):
    torch.manual_seed(1)
    images = torch.rand(3, 3, 40, 48)
    prompts = ["a red cube", "a photo of a dog", 'a sign that says "hi"']
    r = get_reward("pickscore", model=str(tiny_clip_dir), processor=str(tiny_clip_dir))(images, prompts)
    assert r.shape == (3,) and r.dtype == torch.float32

    model, image_emb, text_emb = _reference_embeddings(tiny_clip_dir, images, prompts)
    cos = torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=-1)
    expected = model.logit_scale.exp() * cos / 26
    assert model.logit_scale.exp().item() == pytest.approx(np.exp(3.0), rel=1e-5)
    assert torch.allclose(r, expected.float(), atol=1e-5), (r, expected)
    assert r.abs().max() > 1e-3 and len(set(r.tolist())) == 3  # per-pair scores, not a broadcast


def test_pickscore_missing_model_is_one_clear_error(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(RuntimeError, match=r"pickscore reward: cannot load .*no_such_model.*processor="):
        get_reward("pickscore", model=missing, processor=missing)(torch.rand(1, 3, 8, 8), ["x"])


def test_scorer_dtype_is_half_on_cuda_only():
    for cuda in ("cuda", "cuda:3", torch.device("cuda", 1)):
        assert rewards._scorer_dtype(cuda) == torch.float16, cuda
    for other in ("cpu", torch.device("cpu"), "meta"):
        assert rewards._scorer_dtype(other) == torch.float32, other


def _tiny_mlp(tmp_path):
    torch.manual_seed(2)
    mlp = rewards.AestheticMLP(16).eval()
    torch.save(mlp.state_dict(), tmp_path / "mlp.pth")
    return mlp, str(tmp_path / "mlp.pth")


def test_clip_scorers_are_built_on_their_device(tiny_clip_dir, tmp_path, monkeypatch):
    """The device given to get_reward is where the models load, in _scorer_dtype's precision; the meta
    device stands in for a GPU (it holds shapes, no data). None keeps the CPU. combined_reward passes it on."""
    clip, (_, mlp) = str(tiny_clip_dir), _tiny_mlp(tmp_path)
    built = {}
    for device in (None, "meta"):
        pick = get_reward("pickscore", "sd3", device, model=clip, processor=clip).scorer
        aes = get_reward("aesthetic", "sd3", device=device, clip=clip, mlp=mlp).scorer
        for scorer in (pick, aes):
            scorer._load()
        built[device] = ({p.device.type for s in (pick, aes) for p in s.model.parameters()},
                         {p.dtype for s in (pick, aes) for p in s.model.parameters()},
                         {p.device.type for p in aes.mlp.parameters()})
    assert built[None] == ({"cpu"}, {torch.float32}, {"cpu"})
    assert built["meta"] == ({"meta"}, {torch.float32}, {"meta"})

    calls = []
    record = lambda name, world, device=None, **o: calls.append((name, world, device))  # noqa: E731
    monkeypatch.setattr(rewards, "get_reward", record)
    combined_reward("pickscore,ocr", "sd3", "cuda:1", pickscore=dict(model=clip))
    assert calls == [("pickscore", "sd3", "cuda:1"), ("ocr", "sd3", "cuda:1")]


def test_clip_scorers_in_half_precision(tiny_clip_dir, tmp_path, monkeypatch):
    """What CUDA gets (float16 CLIP), run on the CPU: the inputs must be cast to the model's dtype, and the
    scores come back as float32 on the CPU, close to the float32 ones (the cosine is taken in float32)."""
    clip, (_, mlp) = str(tiny_clip_dir), _tiny_mlp(tmp_path)
    torch.manual_seed(1)
    images, prompts = torch.rand(3, 3, 40, 48), ["a red cube", "a photo of a dog", 'a sign that says "hi"']
    full = [get_reward("pickscore", model=clip, processor=clip)(images, prompts),
            get_reward("aesthetic", clip=clip, mlp=mlp)(images, prompts)]
    monkeypatch.setattr(rewards, "_scorer_dtype", lambda device: torch.float16)
    monkeypatch.setattr(rewards, "_CACHE", {})
    pick = get_reward("pickscore", "sd3", "cpu", model=clip, processor=clip)
    aes = get_reward("aesthetic", "sd3", "cpu", clip=clip, mlp=mlp)
    half = [pick(images, prompts), aes(images, prompts)]
    assert {p.dtype for p in pick.scorer.model.parameters()} == {torch.float16}
    assert {p.dtype for p in aes.scorer.model.parameters()} == {torch.float16}
    assert {p.dtype for p in aes.scorer.mlp.parameters()} == {torch.float32}  # a few MB: kept in float32
    for h, f in zip(half, full):
        assert h.dtype == torch.float32 and h.device.type == "cpu" and h.shape == (3,)
        assert torch.allclose(h, f, atol=5e-3) and not torch.equal(h, f), (h, f)  # really computed in half
    # an explicit dtype wins (Flow-GRPO runs its CLIP scorers in float32 on CUDA)
    explicit = get_reward("pickscore", "sd3", "cpu", dtype="float32", model=clip, processor=clip)
    assert explicit.scorer.dtype == torch.float32


def test_local_folders_from_the_environment(tiny_clip_dir, tmp_path, monkeypatch):
    """Offline clusters: FLOWOPD_PICKSCORE_MODEL / _PROCESSOR and FLOWOPD_AESTHETIC_CLIP / _MLP name local
    copies (HF_HUB_OFFLINE=1 here: the hub ids would fail); a folder that is not there is one clear line."""
    clip, (_, mlp) = str(tiny_clip_dir), _tiny_mlp(tmp_path)
    images, prompts = torch.rand(2, 3, 32, 32), ["a cat", "a dog"]
    by_option = [get_reward("pickscore", model=clip, processor=clip)(images, prompts),
                 get_reward("aesthetic", clip=clip, mlp=mlp)(images, prompts)]
    for name, value in [("FLOWOPD_PICKSCORE_MODEL", clip), ("FLOWOPD_PICKSCORE_PROCESSOR", clip),
                        ("FLOWOPD_AESTHETIC_CLIP", clip), ("FLOWOPD_AESTHETIC_MLP", mlp)]:
        monkeypatch.setenv(name, value)
    by_env = [get_reward("pickscore")(images, prompts), get_reward("aesthetic")(images, prompts)]
    assert all(torch.equal(a, b) for a, b in zip(by_option, by_env))

    missing = str(tmp_path / "no_such_folder")
    monkeypatch.setenv("FLOWOPD_PICKSCORE_MODEL", missing)  # the processor still loads from its folder
    with pytest.raises(RuntimeError) as e:
        get_reward("pickscore")(images, prompts)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"pickscore reward: cannot load CLIPModel from '{missing}': "
                                                       "no such folder;")
    assert "model=" in message and "FLOWOPD_PICKSCORE_MODEL" in message
    monkeypatch.setenv("FLOWOPD_AESTHETIC_CLIP", missing)
    with pytest.raises(RuntimeError, match=r"aesthetic reward: cannot load CLIPImageProcessor\w* .*no such folder.*"
                                           r"FLOWOPD_AESTHETIC_CLIP"):
        get_reward("aesthetic")(images, prompts)


def test_aesthetic_formula_pth_and_safetensors(tiny_clip_dir, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(2)
    mlp = rewards.AestheticMLP(16).eval()
    torch.save(mlp.state_dict(), tmp_path / "mlp.pth")
    save_file(mlp.state_dict(), str(tmp_path / "mlp.safetensors"))

    images = torch.rand(2, 3, 32, 32)
    r_pth = get_reward("aesthetic", clip=str(tiny_clip_dir), mlp=str(tmp_path / "mlp.pth"))(images, ["", ""])
    r_st = get_reward("aesthetic", clip=str(tiny_clip_dir), mlp=str(tmp_path / "mlp.safetensors"))(images, ["", ""])
    assert r_pth.shape == (2,) and torch.equal(r_pth, r_st)

    _, image_emb, _ = _reference_embeddings(tiny_clip_dir, images)
    with torch.no_grad():
        expected = mlp(image_emb / image_emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    assert torch.allclose(r_pth, expected, atol=1e-5), (r_pth, expected)
    with pytest.raises(RuntimeError, match="mlp="):
        get_reward("aesthetic", clip=str(tiny_clip_dir), mlp=str(tmp_path / "absent.pth"))(images, ["", ""])


# -----------------------------------------------------------------------------
# GenEval / DeQA clients against a stub reward server


@pytest.fixture
def stub_server():
    """A server answering like yifan123/reward-server: it records each request and replies with
    reply(payload) pickled (or a 500 with a traceback, as the real server sends traceback.format_exc())."""
    state = {"requests": [], "reply": None}

    def respond(payload):
        state["requests"].append(payload)
        try:
            return 200, pickle.dumps(state["reply"](payload))
        except Exception as e:
            return 500, f"Traceback (most recent call last):\n  ...\n{type(e).__name__}: {e}".encode()

    with serve(respond) as url:
        state["url"] = url
        yield state


def _decode_jpegs(payload):
    from PIL import Image

    return [Image.open(io.BytesIO(b), formats=["jpeg"]) for b in payload["images"]]


def test_geneval_client(stub_server):
    metadata = [{"tag": "counting", "prompt": f"{i} cats", "include": [{"class": "cat", "count": i}]} for i in range(1, 4)]

    def reply(payload):
        n = len(payload["images"])
        counts = [m["include"][0]["count"] for m in payload["meta_datas"]]
        return {"scores": [c / 10 for c in counts], "rewards": [0.0] * n, "strict_rewards": [1.0] * n,
                "group_rewards": {"counting": [0.0] * n}, "group_strict_rewards": {"counting": [1.0] * n}}

    stub_server["reply"] = reply
    # smooth pictures (noise does not survive JPEG), each one different
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 24), torch.linspace(0, 1, 40), indexing="ij")
    images = torch.stack([torch.stack([xx, yy, k * (xx + yy) / 2]) for k in (0.2, 0.6, 1.0)])
    r = get_reward("geneval", url=stub_server["url"], batch_size=2)(images, ["p"] * 3, metadata)
    assert r.dtype == torch.float32 and torch.allclose(r, torch.tensor([0.1, 0.2, 0.3]))

    # two requests (batch_size 2), in order, each in the server's expected format
    reqs = stub_server["requests"]
    assert [len(q["images"]) for q in reqs] == [2, 1]
    assert [m for q in reqs for m in q["meta_datas"]] == metadata
    assert all(q["only_strict"] is True and set(q) == {"images", "meta_datas", "only_strict"} for q in reqs)
    decoded = _decode_jpegs(reqs[0])
    assert decoded[1].format == "JPEG" and decoded[1].size == (40, 24)  # PIL sizes are (W, H)
    pixels = torch.from_numpy(np.array(decoded[1].convert("RGB"))).permute(2, 0, 1).float() / 255
    assert (pixels - images[1]).abs().mean() < 0.02  # the same picture, up to JPEG loss
    assert (pixels - images[0]).abs().mean() > 0.05  # ... and not its neighbour

    strict = get_reward("geneval", url=stub_server["url"], field="strict_rewards")(images, ["p"] * 3, metadata)
    assert torch.equal(strict, torch.ones(3))
    get_reward("geneval", url=stub_server["url"], field="rewards")(images[:1], ["p"], metadata[:1])
    assert stub_server["requests"][-1]["only_strict"] is False  # GenEval's own 'correct' needs the full check
    with pytest.raises(ValueError, match="metadata"):
        get_reward("geneval", url=stub_server["url"])(images, ["p"] * 3, None)


def test_deqa_client_and_env_url(stub_server, monkeypatch):
    stub_server["reply"] = lambda payload: {"outputs": [4.25 - i for i in range(len(payload["images"]))]}
    monkeypatch.setenv("FLOWOPD_DEQA_URL", stub_server["url"])
    images = torch.rand(2, 3, 16, 16)
    r = get_reward("deqa")(images, ["a", "b"], None)
    assert torch.allclose(r, torch.tensor([4.25, 3.25]))  # DeQA's 1-5 scale, returned as is
    assert set(stub_server["requests"][0]) == {"images"} and len(_decode_jpegs(stub_server["requests"][0])) == 2
    r5 = get_reward("deqa", scale=5.0)(images, ["a", "b"], None)
    assert torch.allclose(r5, 5 * r)

    stub_server["reply"] = lambda payload: 1 / 0
    monkeypatch.setattr(rewards, "RETRY_DELAY", 0)  # a 500 is retried (tests/test_reward_server.py): no waits here
    with pytest.raises(RuntimeError, match="HTTP 500.*ZeroDivisionError"):
        get_reward("deqa")(images, ["a", "b"], None)


def test_remote_unreachable_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(rewards, "RETRY_DELAY", 0)  # refused connections are retried: no waits here
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RuntimeError, match=f"geneval reward server unreachable at http://127.0.0.1:{port}"):
        get_reward("geneval", port=port, timeout=5)(torch.rand(1, 3, 8, 8), ["p"], [{"tag": "x"}])
    with pytest.raises(RuntimeError, match="deqa reward server unreachable"):
        get_reward("deqa", host="127.0.0.1", port=port, timeout=5)(torch.rand(1, 3, 8, 8), ["p"], None)


# -----------------------------------------------------------------------------
# BatchScorer: scoring batch k while batch k+1 is sampled


def _tiny_batches():
    """Three batches of the tiny world's four tasks, mixed (as a stage's sampled batches)."""
    folder = Path(__file__).resolve().parents[1] / "prompts" / "tiny"
    tasks = ["geneval", "ocr", "deqa", "pickscore"] * 3
    prompts = [(folder / f"{t}_train.txt").read_text().splitlines()[i] for i, t in enumerate(tasks)]
    torch.manual_seed(3)
    images = torch.rand(len(tasks), 3, 32, 32)
    return images, prompts, [{}] * len(tasks), tasks, [slice(0, 5), slice(5, 6), slice(6, 12)]


def test_batch_scorer_equals_scoring_all_at_once():
    images, prompts, metadata, tasks, batches = _tiny_batches()
    task_reward = {t: get_reward(t, "tiny") for t in rewards.TINY_REWARDS}
    scorer = rewards.BatchScorer(task_reward)
    futures = [scorer.submit(images[b], prompts[b], metadata[b], tasks[b]) for b in batches]
    scores = scorer.result()
    expected = rewards.score_by_task(task_reward, images, prompts, metadata, tasks)
    assert scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert torch.equal(scores, expected) and len(set(expected.tolist())) > 6, (scores, expected)  # in order
    assert all(torch.equal(f.result(), expected[b]) for f, b in zip(futures, batches))
    assert scorer.result().shape == (0,)  # result() empties it

    # one reward function (no task routing) works the same way
    pick = get_reward("pickscore", "tiny")
    scorer = rewards.BatchScorer(pick)
    for b in batches:
        scorer.submit(images[b], prompts[b])
    assert torch.equal(scorer.result(), pick(images, prompts))
    with pytest.raises(ValueError, match="tasks"):
        scorer.submit(images, prompts, metadata, tasks)  # routing needs a {task: fn} dict
    with pytest.raises(ValueError, match="tasks"):
        rewards.BatchScorer(task_reward).submit(images, prompts, metadata)


def test_batch_scorer_runs_in_the_background_and_reraises():
    import threading

    release, threads = threading.Event(), []

    def slow(images, prompts, metadata):  # stands in for OCR or a reward server
        threads.append(threading.current_thread())
        assert release.wait(5)
        if "bad" in prompts:
            raise ZeroDivisionError("scorer failed")
        return images.flatten(1).mean(1)

    scorer = rewards.BatchScorer(slow)
    first = scorer.submit(torch.rand(2, 3, 4, 4), ["a", "b"])
    assert not first.done()  # submit came back while the batch waits to be scored: sampling goes on
    release.set()
    assert scorer.result().shape == (2,) and threads[0] is not threading.current_thread()

    for prompts in (["a"], ["bad"], ["c"]):
        scorer.submit(torch.rand(1, 3, 4, 4), prompts)
    with pytest.raises(ZeroDivisionError, match="scorer failed"):
        scorer.result()
    assert scorer.submit(torch.ones(1, 3, 4, 4), ["d"]) and torch.equal(scorer.result(), torch.ones(1))  # usable again
    # SystemExit too (the reward-server clients' one-line errors): not swallowed by the worker thread
    scorer = rewards.BatchScorer(lambda images, prompts, metadata: (_ for _ in ()).throw(SystemExit("error: x")))
    scorer.submit(torch.ones(1, 3, 4, 4), ["e"])
    with pytest.raises(SystemExit, match="error: x"):
        scorer.result()


def test_ocr_engine_and_models_reach_the_engine(monkeypatch, tmp_path):
    """FLOWOPD_OCR_ENGINE / FLOWOPD_OCR_MODELS reach the engine's configuration (fakes record it, nothing is
    downloaded): PaddleOCR as Flow-GRPO builds it; rapidocr with English models from a local folder; a missing
    engine is one line with its install command; ocr_engine() names engine, version and models."""
    rapidocr = pytest.importorskip("rapidocr")
    monkeypatch.setattr(rapidocr, "RapidOCR", FakeRapidOCR)
    monkeypatch.setattr(rewards, "_CACHE", {})
    for name in ("FLOWOPD_OCR_ENGINE", "FLOWOPD_OCR_MODELS"):
        monkeypatch.delenv(name, raising=False)
    for name in ("en_PP-OCRv3_det_infer.onnx", "en_PP-OCRv4_rec_infer.onnx", "en_dict.txt"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setenv("FLOWOPD_OCR_ENGINE", "rapidocr")
    monkeypatch.setenv("FLOWOPD_OCR_MODELS", str(tmp_path))
    FakeRapidOCR.built.clear()
    get_reward("ocr", "sd3")(torch.ones(1, 3, 256, 256), ['say "hi"'])
    [params] = FakeRapidOCR.built
    assert params["Det.model_path"] == str(tmp_path / "en_PP-OCRv3_det_infer.onnx")
    assert params["Rec.model_path"] == str(tmp_path / "en_PP-OCRv4_rec_infer.onnx")
    assert params["Rec.rec_keys_path"] == str(tmp_path / "en_dict.txt") and params["Rec.lang_type"] == "en"
    info = rewards.ocr_engine()
    assert info["engine"] == "rapidocr" and info["version"] == rewards.OCR_ENGINES["rapidocr"][0]  # the pinned one
    assert "en_PP-OCRv4_rec_infer.onnx" in info["models"]
    monkeypatch.delenv("FLOWOPD_OCR_MODELS")
    assert rewards.ocr_engine()["models"].startswith("bundled")  # the tiny world's and the CPU tests' engine

    (tmp_path / "other_rec.onnx").write_bytes(b"")  # two recognisers: which one?
    with pytest.raises(SystemExit, match=r"^error: ocr reward: FLOWOPD_OCR_MODELS .* one \*rec\*\.onnx"):
        rewards.ocr_engine(models=tmp_path)

    built = []
    paddle = types.ModuleType("paddleocr")
    paddle.PaddleOCR = lambda **kw: built.append(kw) or types.SimpleNamespace(ocr=lambda image, cls: [[[None, ("hi", 0.9)]]])
    monkeypatch.setitem(sys.modules, "paddleocr", paddle)
    monkeypatch.setattr(rewards, "_installed", lambda module: True)
    monkeypatch.setattr("importlib.metadata.version", lambda name: "2.9.1")
    monkeypatch.setenv("FLOWOPD_OCR_ENGINE", "auto")  # PaddleOCR where it is installed
    assert get_reward("ocr", "sd3")(torch.ones(1, 3, 256, 256), ['say "hi"'])[0] == 1.0
    assert built[0]["lang"] == "en" and built[0]["use_angle_cls"] is False
    assert rewards.ocr_engine() == dict(engine="paddleocr", version="2.9.1", models="PaddleOCR lang=en, use_angle_cls=False")

    monkeypatch.setattr(rewards, "_installed", lambda module: False)
    monkeypatch.setenv("FLOWOPD_OCR_ENGINE", "paddleocr")
    with pytest.raises(SystemExit) as e:
        get_reward("ocr", "sd3")
    assert str(e.value).startswith("error: ocr reward: engine paddleocr is not installed: pip install") and "\n" not in str(e.value)
    assert "paddleocr==2.9.1" in str(e.value)


@pytest.mark.parametrize("name, env, install", [("imagereward", "FLOWOPD_IMAGEREWARD_DIR", "pip install image-reward"),
                                                ("hpsv2", "FLOWOPD_HPSV2_CHECKPOINT", "pip install hpsv2")])
def test_quality_scorers_without_their_package_or_weights_are_one_line(monkeypatch, tmp_path, name, env, install):
    """ImageReward and HPS-v2.1 (the paper's quality table) are optional: asked for without the package, or with a
    local weights setting that names nothing, get_reward stops at once (before any sampling) with one line that
    says what to install or fetch. Nothing is imported or downloaded."""
    monkeypatch.setattr(rewards, "_CACHE", {})
    monkeypatch.setattr(rewards, "_installed", lambda module: False)
    with pytest.raises(SystemExit) as e:
        get_reward(name, "sd3", "cpu")
    assert str(e.value).startswith(f"error: {name} reward: package ") and install in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setattr(rewards, "_installed", lambda module: True)
    monkeypatch.setenv(env, str(tmp_path / "missing"))
    with pytest.raises(SystemExit) as e:
        get_reward(name, "sd3", "cpu")
    assert str(e.value).startswith(f"error: {name} reward: {env}") and "hf download" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.delenv(env)
    scorer = get_reward(name, "sd3", "cpu").scorer
    assert scorer.model is None  # with the setting unset: built on the device, nothing loaded until the first call
