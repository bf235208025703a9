"""The SD3 prompt files: where worlds.prompt_file looks (prompts/<kind>/, or FLOWOPD_PROMPTS), the one error line
that names the file to get and from where, and prompts/get_sd3_prompts.py's byte-for-byte check (git blob ids at
the pinned Flow-GRPO commit) on a stand-in source folder."""

import importlib.util
import os
import types

import pytest

import worlds
from helpers import ROOT

SD3 = types.SimpleNamespace(kind="sd3")


def load_getter():
    spec = importlib.util.spec_from_file_location("get_sd3_prompts", os.path.join(ROOT, "prompts", "get_sd3_prompts.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prompt_root_override_and_the_missing_file_line(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWOPD_PROMPTS", str(tmp_path))
    (tmp_path / "sd3").mkdir()
    (tmp_path / "sd3" / "ocr_test.txt").write_text('a sign that says "hi"\n')
    (tmp_path / "sd3" / "geneval_test.jsonl").write_text('{"prompt": "a photo of a cat", "tag": "single_object"}\n')
    assert worlds.prompt_file(SD3, "ocr", "test") == str(tmp_path / "sd3" / "ocr_test.txt")
    assert worlds.prompt_file(SD3, "geneval", "test").endswith("geneval_test.jsonl")  # .jsonl first, as Flow-GRPO's GenEval

    for task, split, says in [("geneval", "train", "dataset/geneval/train_metadata.jsonl"), ("ocr", "train", "dataset/ocr/train.txt"),
                              ("pickscore", "test", "dataset/pickscore/test.txt"), ("deqa", "test", "DrawBench"),
                              ("deqa", "train", "cp pickscore_train.txt deqa_train.txt")]:
        with pytest.raises(SystemExit) as e:
            worlds.prompt_file(SD3, task, split)
        line = str(e.value.code)
        assert "\n" not in line and line.startswith("error:") and f"{task}_{split}.txt or .jsonl" in line and says in line, line
        if task != "deqa":
            assert "github.com/yifan123/flow_grpo" in line and "prompts/get_sd3_prompts.py" in line, line

    monkeypatch.delenv("FLOWOPD_PROMPTS")
    assert worlds.prompt_file(types.SimpleNamespace(kind="tiny"), "ocr", "test") == os.path.join(ROOT, "prompts", "tiny", "ocr_test.txt")


def test_getter_checks_every_file_against_its_pinned_blob_id(tmp_path, monkeypatch, capsys):
    getter = load_getter()
    assert getter.blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"  # `git hash-object` of it
    source, out = tmp_path / "flow_grpo", tmp_path / "out"
    files = {"dataset/ocr/test.txt": b'a sign that says "hi"\na mug printed with "ok"\n', "LICENSE": b"MIT License\n"}
    for path, data in files.items():
        (source / os.path.dirname(path)).mkdir(parents=True, exist_ok=True)
        (source / path).write_bytes(data)
    monkeypatch.setattr(getter, "FILES", {"ocr_test.txt": ("dataset/ocr/test.txt", getter.blob_id(files["dataset/ocr/test.txt"]), 2),
                                          "LICENSE-flow_grpo": ("LICENSE", getter.blob_id(files["LICENSE"]), None)})
    monkeypatch.setattr("sys.argv", ["get_sd3_prompts.py", "--source", str(source), "--out", str(out)])
    getter.main()
    assert (out / "ocr_test.txt").read_bytes() == files["dataset/ocr/test.txt"] and (out / "LICENSE-flow_grpo").is_file()

    (source / "dataset/ocr/test.txt").write_bytes(b'a sign that says "hi"\n')  # another version of the file
    with pytest.raises(SystemExit, match="is not the pinned version"):
        getter.main()
    (source / "dataset/ocr/test.txt").unlink()  # a snapshot without the file (as GitHub snapshots lack files over 4 MiB)
    with pytest.raises(SystemExit, match=r"copy by hand from github.com/yifan123/flow_grpo .*flow_grpo dataset/ocr/test.txt -> "):
        getter.main()


def test_getter_pins_the_papers_prompt_sets():
    getter = load_getter()
    assert set(getter.FILES) == {"geneval_train.jsonl", "geneval_test.jsonl", "ocr_train.txt", "ocr_test.txt",
                                 "pickscore_train.txt", "pickscore_test.txt", "LICENSE-flow_grpo"}
    counts = {name: n for name, (_, _, n) in getter.FILES.items()}
    assert counts["geneval_test.jsonl"] == 2212 and counts["ocr_test.txt"] == 1018 and counts["pickscore_test.txt"] == 2048
    # DeQA's test prompts, DrawBench, from the official repository at a pinned commit (200 prompts written 5 times)
    assert getter.OPD_FILES == {"deqa_test.txt": ("dataset/drawbench/test.txt", "8d96e7cf7017ce6ce299a6eec96e21467a2ac7aa", 1000)}
    assert len(getter.OPD_COMMIT) == 40
    for name in getter.FILES:  # every name is one worlds.prompt_file reads (or the licence beside them)
        assert name == "LICENSE-flow_grpo" or name.rsplit(".", 1)[0].split("_")[0] in worlds.TASKS
