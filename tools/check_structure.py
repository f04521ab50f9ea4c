#!/usr/bin/env python3
"""The structure rules of docs/architecture.md, checked on the tree.

1. Arrows only downward: front ends (cli/, python/) -> layer (src/layer*.cpp, moekit/layer.h)
   -> stages and ops (src/stages.cpp, src/ops/, src/routing/) -> backend implementations and
   kernels (src/cpu/). No file includes a header of a layer above its own; src/ops/ includes
   nothing of src/cpu/ (the CPU backend implements what src/ops/ declares, not the reverse);
   src/internal/ includes nothing of the library's layers.
2. No function of src/ or include/ is longer than 200 lines.
3. The test oracles (tests/oracles/) are not part of the library: nothing under src/ or
   include/ includes them.

Prints one line per violation and exits 1 when there is any; 0 otherwise.
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 200

# Headers of the layers above the stages and ops (public headers of front-end concepts too).
LAYER_HEADERS = {"moekit/layer.h", "moekit/layer_file.h", "moekit/pretrained.h", "moekit/train.h",
                 "moekit/checkpoint.h", "moekit/model_family.h"}

# (directory or file prefix, forbidden include prefixes or headers, why)
RULES = [
    ("src/internal/", ("cpu/", "ops/", "routing/", "io/", "train/", *LAYER_HEADERS, "moekit/stages.h"),
     "internal helpers sit below every layer"),
    ("src/ops/", ("cpu/", "io/", "train/", *LAYER_HEADERS), "ops are below the layer and above the backends"),
    ("src/routing/", ("cpu/", "io/", "train/", *LAYER_HEADERS), "the routing core is an op"),
    ("src/stages.cpp", ("cpu/", "io/", "train/", *LAYER_HEADERS), "the stages run on the backend object only"),
    ("src/cpu/", ("io/", "train/", "moekit/stages.h", *LAYER_HEADERS), "backends implement ops, below the stages"),
    ("src/quant/", ("cpu/", "ops/", "io/", "train/", *LAYER_HEADERS), "weight formats are below the ops"),
    ("src/layer", ("cpu/",), "the layer reaches the backend only through the stages"),
    ("include/moekit/", ("cpu/", "ops/", "routing/", "internal/", "io/", "train/"),
     "public headers expose no internals"),
]

INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.M)


def library_files():
    for base in ("src", "include"):
        for path in sorted((ROOT / base).rglob("*")):
            if path.suffix in (".h", ".hpp", ".cpp", ".cc", ".cu"):
                yield path


def check_includes(path, rel, text, problems):
    for inc in INCLUDE.findall(text):
        if "oracles/" in inc or inc.startswith("../"):
            problems.append(f"{rel}: includes {inc} (tests' oracles and relative paths stay out of the library)")
        for prefix, forbidden, why in RULES:
            if rel.startswith(prefix) and any(inc == f or (f.endswith("/") and inc.startswith(f)) for f in forbidden):
                problems.append(f"{rel}: includes {inc} ({why})")


def strip_code(text):
    """The text with comments, string and character literals blanked (newlines kept)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("\n" * text.count("\n", i, j))
            i = j
        elif c == 'R' and text.startswith('R"', i):
            m = re.match(r'R"([^(]*)\(', text[i:])
            end = text.find(")" + m.group(1) + '"', i) if m else -1
            j = n if end < 0 else end + len(m.group(1)) + 2
            out.append('""' + "\n" * text.count("\n", i, j))
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            out.append(c + c)
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def long_functions(text):
    """(first line, line count) of every function body longer than MAX_FUNCTION_LINES."""
    code = strip_code(text)
    stack = []  # kinds of the open blocks: ns, class, init, function, inner
    head_start = 0  # where the text before the next brace begins
    line = 1
    found = []
    for i, c in enumerate(code):
        if c == "\n":
            line += 1
        elif c in ";":
            head_start = i + 1
        elif c == "{":
            head = code[head_start:i]
            if any(k in ("function", "inner", "init") for k in stack):
                kind = "inner"
            elif re.search(r"\bnamespace\b|extern\s*\"\"", head):
                kind = "ns"
            elif re.search(r"\b(class|struct|union|enum)\b", head) and "(" not in head.split("=")[0]:
                kind = "class"
            elif "(" in head and ")" in head and not re.search(r"=\s*$", head.strip() + " ") and \
                    not head.rstrip().endswith("="):
                kind = "function"
            else:
                kind = "init"
            stack.append((kind, line))
            head_start = i + 1
        elif c == "}":
            if stack:
                kind, start = stack.pop()
                if kind == "function" and line - start + 1 > MAX_FUNCTION_LINES:
                    found.append((start, line - start + 1))
            head_start = i + 1
    return found


def main():
    problems = []
    for path in library_files():
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text(encoding="utf-8", errors="replace")
        check_includes(path, rel, text, problems)
        for start, count in long_functions(text):
            problems.append(f"{rel}:{start}: a function of {count} lines (at most {MAX_FUNCTION_LINES})")
    for p in problems:
        print(p)
    if problems:
        print(f"check_structure: {len(problems)} violation(s)")
        return 1
    print("check_structure: arrows downward, no function over 200 lines, oracles outside the library")
    return 0


if __name__ == "__main__":
    sys.exit(main())
