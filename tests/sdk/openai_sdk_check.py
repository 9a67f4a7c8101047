"""The official openai Python SDK gets the same objects through tokentap as directly from the
mock upstream, streaming and not.

usage: openai_sdk_check.py DIRECT_BASE_URL PROXY_BASE_URL
Prints one line per case and a closing 'N passed, N failed' line; exits non-zero on a failure.
"""

import sys

from openai import OpenAI

MODEL = "anthropic/claude-opus-4.6"
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Ünïcödé and tokens, please."},
]


def client(base):
    return OpenAI(base_url=base + "/v1", api_key="sk-sdk-test", max_retries=0, timeout=30)


CASES = {
    "non-streaming": dict(stream=False),
    "non-streaming with search and warning": dict(
        stream=False,
        tools=[{"type": "octen_search"}],
        extra_headers={"x-mock-warning": "deprecated model", "x-mock-cached": "2"},
    ),
    "non-streaming gzip": dict(stream=False, extra_headers={"x-mock-encoding": "gzip"}),
    "streaming": dict(stream=True, extra_headers={"x-mock-chunks": "9"}),
    "streaming with search, CRLF, split reads": dict(
        stream=True,
        tools=[{"type": "octen_search"}],
        extra_headers={"x-mock-crlf": "1", "x-mock-split": "1", "x-mock-event-lines": "1"},
    ),
    # An upstream shaped like OpenAI's: usage only when asked. Through a tokentap that asks,
    # the client still gets what it would have got: no usage, or the usage it asked for.
    "streaming, OpenAI-style upstream, usage not asked": dict(
        stream=True,
        usage=False,
        extra_headers={"x-mock-usage": "openai", "x-mock-reasoning": "5"},
    ),
    "streaming, OpenAI-style upstream, gzip, usage not asked": dict(
        stream=True,
        usage=False,
        extra_headers={"x-mock-usage": "openai", "x-mock-encoding": "gzip"},
    ),
    "streaming, OpenAI-style upstream, usage asked": dict(
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-usage": "openai"},
    ),
}


def run(base, case):
    kw = dict(CASES[case])
    stream = kw.pop("stream")
    kw.pop("usage", None)
    r = client(base).chat.completions.create(
        model=MODEL, messages=MESSAGES, user="sdk-user", stream=stream, **kw
    )
    if stream:
        return [c.model_dump() for c in r]
    return r.model_dump()


def main():
    direct, proxy = sys.argv[1], sys.argv[2]
    passed = failed = 0
    for case in CASES:
        a, b = run(direct, case), run(proxy, case)
        ok = a == b and a not in (None, [], {})
        usage = CASES[case].get("usage", True)
        if isinstance(a, list):
            ok = ok and any(c.get("usage") for c in a) == usage
        else:
            ok = ok and (a.get("usage") is not None) == usage
        print(("ok   " if ok else "FAIL ") + case)
        if not ok:
            print("  direct:", a)
            print("  proxy: ", b)
        passed += ok
        failed += not ok
    try:
        client(proxy).chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_headers={"x-mock-status": "429"}
        )
        print("FAIL 429 raised nothing")
        failed += 1
    except Exception as e:  # the SDK's RateLimitError, parsed from the passed-through body
        ok = type(e).__name__ == "RateLimitError" and "rate limit" in str(e)
        print(("ok   " if ok else "FAIL ") + "429 -> " + type(e).__name__)
        passed += ok
        failed += not ok
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
