#!/usr/bin/python3
"""chat_template.py - renders conversations with Kimi's chat template through jinja2, the
reference kli's native renderer (src/chat.c, kli_chat_render_json) is compared with by
tests/tools-cli.sh.

usage: chat_template.py TEMPLATE CASES OUTDIR
CASES is a JSON list of {"name", "messages", "tools"?}; for each case OUTDIR/NAME.txt gets
the rendered text (generation prompt on) and OUTDIR/NAME.messages.json and
OUTDIR/NAME.tools.json its inputs, for kli. The environment is transformers' (trim_blocks,
lstrip_blocks, a tojson of json.dumps(ensure_ascii=False)), and the tools are deep-sorted
first, as Kimi's tokenizer (tokenization_kimi.py, apply_chat_template) does. Exits 77
when jinja2 is missing.
"""
import json
import os
import sys

try:
    import jinja2
except ImportError:
    sys.stderr.write("chat_template.py: python3-jinja2 is not installed\n")
    sys.exit(77)


def sort_deep(v):
    if isinstance(v, dict):
        return {k: sort_deep(v[k]) for k in sorted(v)}
    if isinstance(v, list):
        return [sort_deep(x) for x in v]
    return v


def main():
    template_path, cases_path, outdir = sys.argv[1:4]
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda v: json.dumps(v, ensure_ascii=False)
    with open(template_path, encoding="utf-8") as f:
        template = env.from_string(f.read())
    with open(cases_path, encoding="utf-8") as f:
        cases = json.load(f)
    for case in cases:
        tools = case.get("tools")
        text = template.render(messages=case["messages"],
                               tools=sort_deep(tools) if tools else None,
                               add_generation_prompt=True)
        base = os.path.join(outdir, case["name"])
        with open(base + ".txt", "w", encoding="utf-8") as f:
            f.write(text)
        with open(base + ".messages.json", "w", encoding="utf-8") as f:
            json.dump(case["messages"], f, ensure_ascii=False)
        with open(base + ".tools.json", "w", encoding="utf-8") as f:
            json.dump(tools if tools else [], f, ensure_ascii=False)


if __name__ == "__main__":
    main()
