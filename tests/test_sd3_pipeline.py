"""
Every stage on the SD3 path, as a user runs them: `bash reproduce_sd3.sh --toy` (the paper's recipe with tiny
budgets, one CPU process per stage) on a tiny random SD3 pipeline built offline (tests/sd3_tiny.py). The real
scorers run where they run offline: rapidocr for OCR, PickScore's CLIP code on tiny random CLIP weights placed
in a private Hugging Face cache under PickScore's hub ids (what the scripts load by default). GenEval and DeQA
are served over HTTP by stand-ins of yifan123/reward-server (tests/stub_reward_server.py: the protocol is real,
the scores made up). The prompt files are small ones written here, found through FLOWOPD_PROMPTS.

Checked: every stage's outputs exist, every adapter loads with diffusers' StableDiffusion3Pipeline.load_lora_weights,
the experts trained on a reward with spread moved away from the base, OPD's KL to its teachers is non-zero at the
start and falls over its epochs (from both cold starts, MAR on), the main table has every model, and a rerun skips
every stage. Plus: --dry-run prints one torchrun line per GPU stage with the asked --nnodes / --nproc_per_node.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import ENV, ROOT, read_log
from sd3_tiny import build_tiny_sd3, tiny_clip_tokenizer
from stub_reward_server import stub_reward_servers

STAGES = ["grpo-geneval", "grpo-ocr", "grpo-deqa", "grpo-pickscore", "grpo-mix", "merge", "sft-init", "opd-merge", "opd-sft"]
PICKSCORE_IDS = ["yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"]  # rewards._PickScore's defaults

GENEVAL = [dict(tag="single_object", include=[dict(cls="cat", count=1)], prompt="a photo of a cat"),
           dict(tag="counting", include=[dict(cls="dog", count=2)], prompt="a photo of two dogs"),
           dict(tag="colors", include=[dict(cls="car", count=1, color="red")], prompt="a photo of a red car"),
           dict(tag="two_object", include=[dict(cls="cup", count=1), dict(cls="book", count=1)], prompt="a photo of a cup and a book")]
PROMPTS = {
    "ocr": ['a sign that says "cat"', 'a poster with the word "sun"', 'a shirt printed with "go"', 'a door marked "exit"'],
    "deqa": ["a castle at sunset", "a bowl of soup on a wooden table", "a mountain lake", "an old tram in the rain"],
    "pickscore": ["a red apple on a table", "a dog running on a beach", "a lighthouse in a storm", "a cup of coffee"],
}


def write_prompts(root):
    """One training prompt per task (the toy's few OPD steps can then specialise the student to each task's teacher,
    which is what makes its KL fall: the merged student starts at the teachers' mean), the others for testing."""
    folder = root / "sd3"
    folder.mkdir(parents=True)
    geneval = [json.dumps(dict(item, include=[{("class" if k == "cls" else k): v for k, v in c.items()} for c in item["include"]]))
               for item in GENEVAL]
    (folder / "geneval_train.jsonl").write_text(geneval[0] + "\n")
    (folder / "geneval_test.jsonl").write_text("\n".join(geneval[1:]) + "\n")
    for task, prompts in PROMPTS.items():
        (folder / f"{task}_train.txt").write_text(prompts[0] + "\n")
        (folder / f"{task}_test.txt").write_text("\n".join(prompts[1:]) + "\n")


def install_tiny_pickscore(hub_cache, tmp):
    """Tiny random CLIP weights (as tests/test_rewards.py's tiny_clip_dir) in a Hugging Face cache layout under
    PickScore's hub ids: with HF_HUB_OFFLINE=1, from_pretrained('yuvalkirstain/PickScore_v1') finds them."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = tiny_clip_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    commit = "0" * 40
    for repo in PICKSCORE_IDS:
        folder = hub_cache / ("models--" + repo.replace("/", "--"))
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text(commit)
        shutil.copytree(tmp, folder / "snapshots" / commit)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """reproduce_sd3.sh --toy once for the module: (pipeline folder, output folder, stdout of the run, of a rerun)."""
    tmp = tmp_path_factory.mktemp("sd3_pipeline")
    pipeline = tmp / "tiny_sd3"
    build_tiny_sd3(pipeline)
    write_prompts(tmp / "prompts")
    install_tiny_pickscore(tmp / "hub", tmp / "clip")
    out = tmp / "out"
    with stub_reward_servers() as (geneval_url, deqa_url):
        env = dict(ENV, PY=sys.executable, FLOWOPD_PROMPTS=str(tmp / "prompts"), HF_HUB_CACHE=str(tmp / "hub"),
                   FLOWOPD_GENEVAL_URL=geneval_url, FLOWOPD_DEQA_URL=deqa_url)
        env.pop("FLOWOPD_AESTHETIC_MLP", None)
        cmd = ["bash", "reproduce_sd3.sh", "--toy", "--out", str(out), str(pipeline)]
        first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
        again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    return str(pipeline), out, first.stdout, again.stdout


def test_every_stage_writes_its_outputs_and_a_rerun_skips_them(toy_run):
    _, out, first, again = toy_run
    for stage in STAGES:
        assert (out / "runs" / stage / "adapter.safetensors").is_file(), stage
        assert (out / "runs" / stage / "DONE").is_file(), stage
        assert f"== {stage}: done" in again, again
    for stage in STAGES:
        if stage != "merge":
            assert read_log(out / "runs" / stage), stage  # one record per epoch / logged step
    assert (out / "runs" / "sft-init" / "cache" / "index.json").is_file()
    assert "preflight: prompt files and reward servers found" in first
    assert "== evaluate: done" in again and "+ " not in again  # nothing ran the second time

    rows = {r["model"]: r for r in json.loads((out / "tables" / "main.json").read_text())["rows"]}
    assert list(rows) == ["base", "grpo-geneval", "grpo-ocr", "grpo-deqa", "grpo-pickscore", "grpo-mix", "merge-init",
                          "sft-init", "opd-sft", "opd-merge"]
    for r in rows.values():
        assert 0 <= r["geneval"] <= 1 and 0 <= r["ocr"] <= 1 and 1 <= r["deqa"] <= 5, r  # DeQA back on its 1-5 scale
        assert all(isinstance(r[k], float) and r[k] == r[k] for k in ("pickscore", "average")), r
    for name in ("main.md", "gain.json"):
        assert (out / "tables" / name).is_file(), name


def test_every_adapter_loads_in_diffusers(toy_run):
    from diffusers import StableDiffusion3Pipeline

    pipeline, out, _, _ = toy_run
    pipe = StableDiffusion3Pipeline.from_pretrained(pipeline)
    x, t = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0)), torch.full((1,), 700.0)
    embeds, pooled = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1)), torch.randn(1, 32, generator=torch.Generator().manual_seed(2))

    def velocity():
        with torch.no_grad():
            return pipe.transformer(hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t, return_dict=False)[0]

    base = velocity()
    moved = {}
    for stage in STAGES:
        name = stage.replace("-", "_")
        pipe.load_lora_weights(str(out / "runs" / stage / "adapter.safetensors"), adapter_name=name)
        pipe.set_adapters([name])
        moved[stage] = (velocity() - base).abs().max().item()
    # GenEval / DeQA (stub scores) and PickScore (tiny CLIP) give a group a reward spread, so those experts trained;
    # OCR on a random pipeline's images reads no text (reward 0 for all: nothing to learn, the adapter stays B = 0)
    for stage in ("grpo-geneval", "grpo-deqa", "grpo-pickscore", "grpo-mix", "merge", "opd-merge", "opd-sft"):
        assert moved[stage] > 1e-5, moved


def test_opd_kl_is_nonzero_at_the_start_and_falls(toy_run):
    _, out, _, _ = toy_run
    for stage in ("opd-merge", "opd-sft"):
        log = read_log(out / "runs" / stage)
        kl, mar = [r["kl"] for r in log], [r["mar"] for r in log]
        assert len(kl) == 6 and kl[0] > 1e-7, (stage, kl)  # the student starts away from its teachers ...
        # ... and distillation closes the gap. An epoch's KL is that of its own prompts and noise, so compare halves:
        # measured here, 14.6 8.2 10.0 6.1 5.4 4.4 (merge) and 11.6 8.7 7.4 4.6 2.7 4.6 (SFT), x 1e-6
        assert sum(kl[3:]) < 0.7 * sum(kl[:3]) and kl[-1] < kl[0], (stage, kl)
        assert all(m > 0 for m in mar), (stage, mar)  # MAR is on: the anchor (the deqa expert) labels every sample
        config = json.loads((out / "runs" / stage / "config.json").read_text())
        assert config["mar_teacher"] == "deqa" and config["mar_weight"] == 0.02 and len(config["teachers"]) == 4



def test_a_resume_with_another_ocr_engine_is_refused(toy_run, tmp_path):
    """The OCR expert's run records the engine that read its reward (engine, version, models): the same command
    with other OCR models (FLOWOPD_OCR_MODELS) is another reward, and its resume stops with one line before
    sampling anything."""
    _, out, _, _ = toy_run
    run = out / "runs" / "grpo-ocr"
    assert json.loads((run / "config.json").read_text())["ocr_engine"]["models"].startswith("bundled")
    logged = read_log(run)
    models = tmp_path / "ocr_models"  # names only: the engine is described, not loaded, before the resume check
    models.mkdir()
    for name in ("en_det.onnx", "en_rec.onnx", "en_dict.txt"):
        (models / name).write_text("")
    env = dict(ENV, FLOWOPD_PROMPTS=str(out.parent / "prompts"), HF_HUB_CACHE=str(out.parent / "hub"),
               FLOWOPD_OCR_MODELS=str(models))
    again = subprocess.run(["bash", "-c", (run / "DONE").read_text()], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert again.returncode == 1 and len(errors) == 1 and "--ocr-engine" in errors[0], again.stderr[-2000:]
    assert read_log(run) == logged  # nothing ran

def test_dry_run_prints_one_torchrun_line_per_gpu_stage(tmp_path):
    def dry(*args):
        r = subprocess.run(["bash", "reproduce_sd3.sh", "--dry-run", "--out", str(tmp_path / "o"), *args], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout.splitlines()

    # the paper's path: four released teachers fetched with hf download (Flow-GRPO's GenEval / OCR / PickScore, the
    # authors' DeQA), GRPO-Mix by epochs, both cold starts at r 32, then OPD from each; no expert is trained
    paper = ["grpo-mix", "merge", "opd-merge", "sft-init", "opd-sft", "evaluate"]
    lines = dry("--nnodes", "4", "--nproc-per-node", "8", "--head", "node0", "/models/sd3.5m")
    assert [l.removeprefix("== ") for l in lines if l.startswith("== ")] == paper
    text = "\n".join(lines)
    released = tmp_path / "o" / "released"
    fetched = [l.split()[2] for l in lines if l.split()[:2] == [".venv/bin/hf", "download"]]
    assert fetched == ["jieliu/SD3.5M-FlowGRPO-GenEval", "jieliu/SD3.5M-FlowGRPO-Text", "CostaliyA/SD3.5M-FlowGRPO-Deqa-Mix",
                       "jieliu/SD3.5M-FlowGRPO-PickScore"]
    assert f"ocr={released}/SD3.5M-FlowGRPO-Text" in text and f"deqa={released}/SD3.5M-FlowGRPO-Deqa-Mix" in text
    assert "--prompts geneval,ocr,pickscore" not in text  # the DeQA teacher is not trained
    assert "--task geneval:3,ocr:1,pickscore:1 --mix epochs --reward deqa:1 " in text  # the paper's text: DeQA 1:1
    assert "--method task-arithmetic --rank 32 --alpha 64" in text

    order = ["grpo-geneval", "grpo-ocr", "grpo-pickscore", "grpo-deqa", "grpo-mix", "merge", "opd-merge", "sft-init",
             "opd-sft", "evaluate"]  # --train-experts: every expert from scratch; each cold start followed by its OPD
    gpu_stages = [s for s in order if s != "merge"]
    lines = dry("--train-experts", "--nnodes", "4", "--nproc-per-node", "8", "--head", "node0", "/models/sd3.5m")
    assert [l.removeprefix("== ") for l in lines if l.startswith("== ")] == order
    launches = [l for l in lines if "torchrun" in l]
    assert len(launches) == len(gpu_stages)
    for line, stage in zip(launches, gpu_stages):
        assert " --nnodes 4 --nproc_per_node 8 " in line and "--rdzv_endpoint node0:29500" in line, line
        assert f"--rdzv_id flowopd-{stage} " in line and "--world /models/sd3.5m" in line, line
    assert any(l.startswith(".venv/bin/python merge.py") or " merge.py " in l for l in lines if "torchrun" not in l)
    assert not (tmp_path / "o").exists()  # a dry run writes nothing

    one = [l for l in dry("--train-experts", "--nproc-per-node", "2", "/models/sd3.5m") if "torchrun" in l]
    assert len(one) == len(gpu_stages) and all(" --nnodes 1 --nproc_per_node 2 --standalone " in l for l in one)

    # the options: the DeQA teacher trained, the authors' OCR-3240, the official config's 0.8 / 0.2
    text = "\n".join(dry("--train-deqa", "--ocr-3240", "--mix-weights", "official", "/models/sd3.5m"))
    assert "== grpo-deqa" in text and "--prompts geneval,ocr,pickscore --reward deqa:0.4,pickscore:0.6" in text
    assert "hf download CostaliyA/SD3.5M-FlowGRPO-OCR-3240" in text and "Deqa-Mix" not in text
    assert "--mix epochs --reward deqa:0.25 " in text

    bad = subprocess.run(["bash", "reproduce_sd3.sh", "--dry-run", "--nnodes", "2", "/models/sd3.5m"], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "needs --head" in bad.stderr


def test_every_printed_command_names_a_cli_that_exists():
    """The commands a user copies: every program the dry run prints lies in the venv that requirements.txt builds
    (hf: huggingface_hub's CLI), and no file names the removed huggingface-cli."""
    r = subprocess.run(["bash", "reproduce_sd3.sh", "--dry-run", "/models/sd3.5m"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=60)
    programs = {line.split()[0] for line in r.stdout.splitlines() if line.startswith(".venv/bin/")}
    assert ".venv/bin/hf" in programs and ".venv/bin/torchrun" in programs
    for program in programs:
        assert os.access(os.path.join(ROOT, program), os.X_OK), program
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for name in tracked:
        if name.endswith((".py", ".sh", ".md", ".txt")) and name != "tests/test_sd3_pipeline.py":
            with open(os.path.join(ROOT, name), errors="replace") as f:
                assert "huggingface-cli" not in f.read(), name
