#!/usr/bin/env python3
"""Drives a running `tern serve` with the official OpenAI Python client (pip install openai):
models, chat (whole and streamed), text completions, an unknown model, and a run-time
adapter load and unload when --adapter-path is given. Exits non-zero on any mismatch.

    tern serve --model MODEL --port 8080 &
    python scripts/serve/check_openai_client.py --base-url http://127.0.0.1:8080/v1 \
        [--adapter-path DIR]
"""
import argparse
import sys

import openai


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--api-key", default="unused")
    ap.add_argument("--adapter-path")
    a = ap.parse_args()
    c = openai.OpenAI(base_url=a.base_url, api_key=a.api_key)

    models = [m.id for m in c.models.list().data]
    print("models:", models)
    base = models[0]
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    whole = c.chat.completions.create(model=base, messages=msgs, max_tokens=24, temperature=0)
    text = whole.choices[0].message.content
    print("chat:", repr(text), whole.choices[0].finish_reason, whole.usage)
    streamed = "".join(
        ch.choices[0].delta.content or ""
        for ch in c.chat.completions.create(
            model=base, messages=msgs, max_tokens=24, temperature=0, stream=True
        )
        if ch.choices
    )
    assert streamed == text, (streamed, text)
    comp = c.completions.create(model="base", prompt="The sky is", max_tokens=8, temperature=0)
    print("completion:", repr(comp.choices[0].text), comp.usage)
    try:
        c.chat.completions.create(model="no-such-adapter", messages=msgs, max_tokens=4)
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError as e:
        print("unknown model:", e.status_code, e.body["message"])
    if a.adapter_path:
        # Run-time loading is tern's own endpoint, outside the OpenAI API: plain HTTP.
        r = c.post("/adapters", body={"name": "runtime", "path": a.adapter_path}, cast_to=object)
        print("loaded:", r)
        ad = c.chat.completions.create(model="runtime", messages=msgs, max_tokens=24, temperature=0)
        print("with adapter:", repr(ad.choices[0].message.content))
        c.delete("/adapters/runtime", cast_to=object)
        assert "runtime" not in [m.id for m in c.models.list().data]
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
