"""
get_sd3_prompts.py: fill prompts/sd3/ with the paper's prompt sets, Flow-GRPO's dataset/ files (MIT),
under the names worlds.prompt_file reads, with Flow-GRPO's copyright notice beside them.

  prompts/sd3/geneval_train.jsonl   <- dataset/geneval/train_metadata.jsonl   (GenEval tag/include metadata)
  prompts/sd3/geneval_test.jsonl    <- dataset/geneval/test_metadata.jsonl    (2,212 lines: 553 prompts, each written 4 times)
  prompts/sd3/ocr_train.txt         <- dataset/ocr/train.txt
  prompts/sd3/ocr_test.txt          <- dataset/ocr/test.txt                   (1,018 prompts)
  prompts/sd3/pickscore_train.txt   <- dataset/pickscore/train.txt            (25,432 Pick-a-Pic captions)
  prompts/sd3/pickscore_test.txt    <- dataset/pickscore/test.txt             (2,048)
  prompts/sd3/LICENSE-flow_grpo     <- LICENSE                                (MIT, Copyright (c) 2025 Jie Liu)
  prompts/sd3/deqa_test.txt         <- CostaliyA/Flow-OPD dataset/drawbench/test.txt (DrawBench: 1,000 lines, its 200
                                       prompts written 5 times each; evaluate.py reads the 200 distinct ones)

Every file is pinned to Flow-GRPO commit ac4c86e (2025-07-18) by its git blob id, so a copy is checked
byte for byte whatever the source; DrawBench's test prompts (DeQA's evaluation) are pinned the same way to
the official Flow-OPD repository's commit cc47e75 (its licence is Flow-GRPO's MIT notice). The paper does
not name DeQA's training prompts (Flow-GRPO's general prompts are the stand-in: copy pickscore_train.txt
to deqa_train.txt; only --train-deqa needs them). prompts/sd3/README.md says the same.

Commands (run from the repository root):
  python prompts/get_sd3_prompts.py                          # download the pinned files from GitHub
  python prompts/get_sd3_prompts.py --source ../flow_grpo --opd-source ../Flow-OPD   # from clones (work tree or git dir)
  python prompts/get_sd3_prompts.py --out /data/prompts/sd3  # elsewhere; then FLOWOPD_PROMPTS=/data/prompts
"""

import argparse
import hashlib
import os
import subprocess
import sys
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
COMMIT = "ac4c86e8cae021841f1fde853d340e0db67690dd"  # yifan123/flow_grpo, "fix imagereward", 2025-07-18
OPD_COMMIT = "cc47e75201ed1530235cd2453ac77713cc2048f0"  # CostaliyA/Flow-OPD, 2026-05-12 (adds dataset/drawbench)
RAW = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"

# our name <- (Flow-GRPO path, git blob id at COMMIT, prompts expected or None where not checked here)
FILES = {
    "geneval_train.jsonl": ("dataset/geneval/train_metadata.jsonl", "0b97e8a6802c08fc7537cd00c76ae79c851bddcb", None),
    "geneval_test.jsonl": ("dataset/geneval/test_metadata.jsonl", "27cdaf5cc1356fe15aeadbb8df55682ca74228f0", 2212),
    "ocr_train.txt": ("dataset/ocr/train.txt", "3ce0521b77b0a9031191d66ecc36ebaaf27a3922", None),
    "ocr_test.txt": ("dataset/ocr/test.txt", "8deb4f8d8f2e863f45353354243669b3c991a6a2", 1018),
    "pickscore_train.txt": ("dataset/pickscore/train.txt", "a437bd921c03fbc00c4e7ce148ae2d28fcd6e49b", 25432),
    "pickscore_test.txt": ("dataset/pickscore/test.txt", "45f05231b969fb5f74c8debd606b22cd3be27f8e", 2048),
    "LICENSE-flow_grpo": ("LICENSE", "125f60c74ae39daa4dba271f5da928cd732ea8a3", None),
}
OPD_FILES = {  # the same, from CostaliyA/Flow-OPD at OPD_COMMIT
    "deqa_test.txt": ("dataset/drawbench/test.txt", "8d96e7cf7017ce6ce299a6eec96e21467a2ac7aa", 1000),
}


def blob_id(data):
    """git's object id of a file's bytes (sha1 of 'blob <size>\\0' + bytes)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_git_dir(path):
    return os.path.isfile(os.path.join(path, "HEAD")) and os.path.isdir(os.path.join(path, "objects"))


def read_source(source, path, blob, repo="yifan123/flow_grpo", commit=COMMIT):
    """The file's bytes, or None when the source does not have it."""
    if source is None:  # GitHub, at the pinned commit
        try:
            with urllib.request.urlopen(RAW.format(repo=repo, commit=commit, path=path), timeout=60) as r:
                return r.read()
        except OSError as e:
            print(f"  cannot download {path}: {e}", file=sys.stderr)
            return None
    git_dir = source if is_git_dir(source) else os.path.join(source, ".git")
    if is_git_dir(git_dir):  # read the pinned blob itself: any checkout of the clone will do
        r = subprocess.run(["git", "--git-dir", git_dir, "cat-file", "blob", blob], capture_output=True)
        if r.returncode == 0:
            return r.stdout
    file = os.path.join(source, path)
    if os.path.isfile(file):
        with open(file, "rb") as f:
            return f.read()
    return None


def count_prompts(data):
    return sum(1 for line in data.decode("utf-8").splitlines() if line.strip())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=None, help="a flow_grpo clone (work tree or git directory); default: download from GitHub")
    parser.add_argument("--opd-source", default=None, help="a CostaliyA/Flow-OPD clone (DrawBench); default: download")
    parser.add_argument("--out", default=os.path.join(HERE, "sd3"), help="where to write (default prompts/sd3)")
    args = parser.parse_args()
    for source, repo in ((args.source, "yifan123/flow_grpo"), (args.opd_source, "CostaliyA/Flow-OPD")):
        if source is not None and not os.path.isdir(source):
            raise SystemExit(f"error: {source} is not a folder (a clone of github.com/{repo})")
    os.makedirs(args.out, exist_ok=True)
    missing = []
    wanted = [(name, item, args.source, "yifan123/flow_grpo", COMMIT) for name, item in FILES.items()]
    # the DrawBench file only where the Flow-GRPO files come from GitHub too, or a Flow-OPD clone is given
    if args.source is None or args.opd_source is not None:
        wanted += [(name, item, args.opd_source, "CostaliyA/Flow-OPD", OPD_COMMIT) for name, item in OPD_FILES.items()]
    for name, (path, blob, expected), source, repo, commit in wanted:
        data = read_source(source, path, blob, repo, commit)
        if data is None:
            missing.append(f"{repo} {path} -> {os.path.join(args.out, name)}")
            continue
        if blob_id(data) != blob:
            raise SystemExit(f"error: {path} from {source or 'GitHub'} is not the pinned version (git blob {blob_id(data)[:12]}, "
                             f"expected {blob[:12]} at {repo} commit {commit[:7]})")
        n = count_prompts(data) if name != "LICENSE-flow_grpo" else None
        if expected is not None and n != expected:
            raise SystemExit(f"error: {path} has {n} prompts, expected {expected}")
        tmp = os.path.join(args.out, f".{name}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(args.out, name))
        print(f"{name:22s} <- {path:40s} {len(data) / 1e6:6.2f} MB" + (f"  {n:,} prompts" if n is not None else ""))
    if missing:
        raise SystemExit(f"error: not found in the source, copy by hand from github.com/yifan123/flow_grpo at commit "
                         f"{COMMIT[:7]} (CostaliyA/Flow-OPD at {OPD_COMMIT[:7]}): " + "; ".join(missing))
    print(f"done: {args.out}. DeQA's training prompts are not named by the paper: see prompts/sd3/README.md")


if __name__ == "__main__":
    main()
