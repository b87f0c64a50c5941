"""Run the CLI on bad input as a new user would, and count tracebacks and "internal error" lines (both must be 0).

Every case runs ``idfusion.cli.main.main`` in this process on the tiny kits and must end in one clear error line
(exit code 1 or 2) or succeed; an exception escaping ``main`` counts as a traceback, an ``internal error:`` line as
a bug. Usage::

    python benchmarks/sweep_bad_inputs.py            # every case, with a summary table
    python benchmarks/sweep_bad_inputs.py --list     # the case names

``tests/test_bad_input_sweep.py`` runs the same cases.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Case:
    name: str
    argv: Callable[[Kit], list[str]]
    expect: str  # a fragment the error line must contain ("" where success is fine too)


@dataclass
class Kit:
    """The files the cases point at, made once: tiny releases and bad files of every kind."""

    root: Path
    faces: Path
    models: dict[str, Path]

    def model(self, method: str) -> str:
        return str(self.models[method])

    def file(self, name: str, data: bytes) -> str:
        path = self.root / "files" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_bytes(data)
        return str(path)

    def copy_model(self, method: str, name: str) -> Path:
        import shutil

        target = self.root / "copies" / name
        if not target.exists():
            shutil.copytree(self.models[method], target)
        return target


def _face(kit: Kit) -> str:
    return str(kit.faces / "obama.jpg")


def _truncated_model(kit: Kit) -> str:
    folder = kit.copy_model("arc2face", "truncated")
    weights = folder / "arc2face" / "diffusion_pytorch_model.safetensors"
    if weights.stat().st_size > 1000:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    return str(folder)


def _refused_pickle_model(kit: Kit) -> str:
    import pickle

    folder = kit.copy_model("arc2face", "refused-pickle")

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (folder / "encoder" / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": Exploit()}))
    return str(folder)


def _gen(method: str, *extra: str, face: bool = True) -> Callable[[Kit], list[str]]:
    def argv(kit: Kit) -> list[str]:
        faces = ["--face", _face(kit)] if face else []
        out = ["--out", str(kit.root / "out" / method)]
        return ["generate", "--method", method, "--model", kit.model(method), *faces, "--steps", "1", *out,
                *(a.format(root=kit.root, faces=kit.faces) for a in extra)]  # fmt: skip

    return argv


def _raw(*args: str) -> Callable[[Kit], list[str]]:
    return lambda kit: [a.format(root=kit.root, faces=kit.faces) for a in args]


def cases() -> list[Case]:
    """The sweep: the issue's 19 former internal errors first, then the other bad inputs a user meets."""
    text_lora = lambda kit: kit.file("notes.txt", b"these are my notes, not a LoRA\n")  # noqa: E731
    random_lora = lambda kit: kit.file("random.safetensors", os.urandom(4096))  # noqa: E731
    return [
        # formerly "internal error"
        Case("lora random bytes", lambda k: [*_gen("arc2face")(k), "--lora", random_lora(k)], "random.safetensors"),
        Case("lora text file", lambda k: [*_gen("arc2face")(k), "--lora", text_lora(k)], "notes.txt"),
        Case(
            "truncated safetensors model",
            lambda k: [*_gen("arc2face")(k)[:3], "--model", _truncated_model(k), "--face", _face(k), "--steps", "1"],
            "truncated",
        ),  # fmt: skip
        Case(
            "refused pickle",
            lambda k: [
                *_gen("arc2face")(k)[:3],
                "--model",
                _refused_pickle_model(k),
                "--face",
                _face(k),
                "--steps",
                "1",
            ],
            "posix.system",
        ),  # fmt: skip
        Case("out in /proc", _gen("arc2face", "--out", "/proc/idfusion-x"), "/proc/idfusion-x"),
        Case("num images 10000", _gen("arc2face", "--num-images", "10000"), "--num-images"),
        Case("steps 100000", _gen("arc2face", "--steps", "100000"), "--steps"),
        Case("width 100000", _gen("arc2face", "--width", "100000"), "--width"),
        # files
        Case("missing face", _gen("arc2face", "--face", "{root}/nope.jpg", face=False), "nope.jpg"),
        Case(
            "text file as face",
            lambda k: [*_gen("arc2face", face=False)(k), "--face", k.file("face.jpg", b"hi")],
            "face.jpg",
        ),  # fmt: skip
        Case(
            "empty face file",
            lambda k: [*_gen("arc2face", face=False)(k), "--face", k.file("empty.png", b"")],
            "empty.png",
        ),  # fmt: skip
        Case("faceless photo", lambda k: [*_gen("arc2face", face=False)(k), "--face", _blue(k)], "no face found"),
        Case("folder as face", _gen("arc2face", "--face", "{root}", face=False), "is a directory"),
        Case(
            "missing model",
            _raw("generate", "--method", "arc2face", "--model", "{root}/no-model", "--face", "{faces}/obama.jpg"),
            "no-model",
        ),  # fmt: skip
        Case(
            "empty model folder",
            lambda k: ["generate", "--method", "arc2face", "--model", _empty(k), "--face", _face(k)],
            "empty-model",
        ),  # fmt: skip
        Case(
            "wrong method's model",
            lambda k: [*_gen("arc2face")(k)[:3], "--model", k.model("flashface"), "--face", _face(k), "--steps", "1"],
            "encoder/pytorch_model.bin",
        ),  # fmt: skip
        Case("out is a file", lambda k: [*_gen("arc2face")(k), "--out", k.file("out.txt", b"x")], "out.txt"),
        # values
        Case("width not multiple of 8", _gen("arc2face", "--width", "100"), "multiple of 8"),
        Case("negative steps", _gen("arc2face", "--steps", "-3"), "--steps"),
        Case("steps not a number", _gen("arc2face", "--steps", "many"), "--steps"),
        Case("seed not a number", _gen("arc2face", "--seed", "abc"), "--seed"),
        Case("guidance nan", _gen("arc2face", "--guidance", "nan"), "--guidance"),
        Case("unknown scheduler", _gen("arc2face", "--scheduler", "magic"), "--scheduler"),
        Case("unknown method", _raw("generate", "--method", "magic", "--face", "{faces}/obama.jpg"), "--method"),
        Case("no method", _raw("generate", "--face", "{faces}/obama.jpg"), "--method"),
        Case("no face", _gen("arc2face", face=False), "--face"),
        Case("option of another method", _gen("arc2face", "--feed-scale", "0.5"), "--feed-scale"),
        Case("bad face weight", _gen("flashface", "--face", "{faces}/obama.jpg:heavy", face=False), "heavy"),
        Case("bad face box", _gen("flashface", "--face-box", "0.9,0.9,0.1,0.1"), "--face-box"),
        Case("face box out of range", _gen("flashface", "--face-box", "0,0,2,2"), "--face-box"),
        Case(
            "group photo as reference",
            _gen("flashface", "--face", "{faces}/group_six_faces.jpg", face=False),
            "6 faces",
        ),  # fmt: skip
        Case("five references", _gen("flashface", *["--face", "{faces}/obama.jpg"] * 5, face=False), "reference"),
        Case(
            "face index out of range",
            _gen("arc2face", "--face", "{faces}/group_six_faces.jpg", "--face-index", "9", face=False),
            "face index 9",
        ),  # fmt: skip
        Case("unknown style", _gen("fact", "--style", "no-such-style"), "no-such-style"),
        Case("adapter scale text", _gen("fact", "--adapter-scale", "lots"), "--adapter-scale"),
        Case("feed scale inf", _gen("feedface", "--feed-scale", "inf"), "--feed-scale"),
        Case("bad dtype", _gen("arc2face", "--dtype", "float8"), "--dtype"),
        Case("cuda without a GPU", _gen("arc2face", "--device", "cuda"), "cuda"),
        Case("unknown device", _gen("arc2face", "--device", "tpu9"), "tpu9"),
        # --from
        Case("from a jpeg", _raw("generate", "--from", "{faces}/obama.jpg"), "obama.jpg"),
        Case("from a png without metadata", lambda k: ["generate", "--from", _plain_png(k)], "plain.png"),
        Case("from a missing file", _raw("generate", "--from", "{root}/gone.png"), "gone.png"),
        # other commands
        Case(
            "template missing",
            _raw("template", "--template", "{root}/no.jpg", "--face", "{faces}/obama.jpg"),
            "no.jpg",
        ),  # fmt: skip
        Case(
            "template faceless",
            lambda k: [
                "template",
                "--model",
                k.model("fact"),
                "--template",
                _blue(k),
                "--face",
                _face(k),
                "--steps",
                "1",
                "--out",
                str(k.root / "t"),
            ],
            "no face",
        ),  # fmt: skip
        Case(
            "template face index",
            lambda k: [
                "template",
                "--model",
                k.model("fact"),
                "--template",
                _face(k),
                "--face",
                _face(k),
                "--face-index",
                "3",
                "--steps",
                "1",
                "--out",
                str(k.root / "t"),
            ],
            "face index 3",
        ),  # fmt: skip
        Case("faces on a text file", lambda k: ["faces", k.file("x.jpg", b"text")], "x.jpg"),
        Case("make-tiny into a file", lambda k: ["make-tiny", "--method", "sd15", "--out", k.file("f", b"x")], "f"),
        Case("convert missing", _raw("convert", "--method", "flashface", "{root}/none", "{root}/conv"), "none"),
        Case("demo identities 9", _raw("demo", "--identities", "9", "--out", "{root}/demo"), "identities"),
        Case(
            "demo out in /proc",
            _raw("demo", "--identities", "1", "--steps", "1", "--out", "/proc/idf-demo"),
            "/proc/idf-demo",
        ),  # fmt: skip
    ]


def _blue(kit: Kit) -> str:
    from PIL import Image

    path = kit.root / "files" / "blue.png"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (320, 240), (20, 40, 230)).save(path)
    return str(path)


def _plain_png(kit: Kit) -> str:
    from PIL import Image

    path = kit.root / "files" / "plain.png"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16)).save(path)
    return str(path)


def _empty(kit: Kit) -> str:
    path = kit.root / "empty-model"
    path.mkdir(exist_ok=True)
    return str(path)


@dataclass
class Outcome:
    case: Case
    code: int | None
    err: str
    traceback: str | None = None

    @property
    def internal(self) -> bool:
        return "internal error" in self.err

    @property
    def ok(self) -> bool:
        if self.traceback is not None or self.internal or self.code is None:
            return False
        if self.code == 0:
            return not self.case.expect
        lines = [line for line in self.err.splitlines() if "error" in line]
        return bool(lines) and self.case.expect in self.err


def make_kit(root: Path, faces: Path) -> Kit:
    from idfusion.testing import make_tiny

    models = {}
    for method in ("arc2face", "flashface", "fact", "feedface"):
        folder = root / "models" / method
        if not folder.exists():
            make_tiny(method, folder, seed=0)
        models[method] = folder
    return Kit(root=root, faces=faces, models=models)


def run_case(kit: Kit, case: Case) -> Outcome:
    import traceback

    from idfusion.cli.main import main

    err, out = io.StringIO(), io.StringIO()
    try:
        argv = case.argv(kit)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = main(argv)
            except SystemExit as exit_:  # argparse's usage errors
                code = int(exit_.code or 0)
    except Exception:  # noqa: BLE001 - exactly what the sweep counts
        return Outcome(case, None, err.getvalue(), traceback.format_exc())
    return Outcome(case, code, err.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/faces")
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    args = parser.parse_args(argv)
    if args.list:
        for case in cases():
            print(case.name)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        kit = make_kit(Path(tmp), args.faces)
        outcomes = [run_case(kit, case) for case in cases()]
    width = max(len(o.case.name) for o in outcomes)
    for o in outcomes:
        last = (o.err.strip().splitlines() or [""])[-1][:110]
        print(f"{'ok ' if o.ok else 'BAD'} {o.case.name:<{width}}  exit {o.code}  {last}")
        if o.traceback:
            print(o.traceback)
    tracebacks = sum(o.traceback is not None for o in outcomes)
    internal = sum(o.internal for o in outcomes)
    bad = sum(not o.ok for o in outcomes)
    print(f"{len(outcomes)} cases: {tracebacks} tracebacks, {internal} internal errors, {bad} not as expected")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
