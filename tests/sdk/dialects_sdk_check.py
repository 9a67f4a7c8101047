"""The official openai SDK (Responses API) and anthropic SDK (Messages API) get the same
objects through tokentap as directly from the mock upstream, streaming and not; and a capped
user gets each SDK's own rate-limit error from tokentap.

usage: dialects_sdk_check.py DIRECT_BASE_URL PROXY_BASE_URL PROXY_KEY CAPPED_KEY CAPPED_USER [MESSAGES_USER]
(MESSAGES_USER: the Messages calls' metadata.user_id, default sdk-user)
Prints one line per case and a closing 'N passed, N failed' line; exits non-zero on a failure.
"""

import sys

import anthropic
import openai

GPT = "gpt-5"
CLAUDE = "claude-sonnet-4-5"
USER = "sdk-user"
MESSAGES_USER = [USER]


def oa(base, key):
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=30)


def an(base, key):
    return anthropic.Anthropic(base_url=base, api_key=key, max_retries=0, timeout=30)


def responses_create(base, key, stream, **kw):
    r = oa(base, key).responses.create(
        model=GPT,
        input="Ünïcödé and tokens, please.",
        instructions="Be brief.",
        safety_identifier=kw.pop("user", USER),
        stream=stream,
        **kw,
    )
    if stream:
        return [e.model_dump() for e in r]
    return r.model_dump()


def responses_stream_helper(base, key, **kw):
    with oa(base, key).responses.stream(
        model=GPT, input="Tokens, please.", safety_identifier=USER, **kw
    ) as s:
        events = [e.type for e in s]
        return events, s.get_final_response().model_dump()


def messages_create(base, key, stream, **kw):
    r = an(base, key).messages.create(
        model=CLAUDE,
        max_tokens=256,
        system="Be brief.",
        messages=[{"role": "user", "content": "Ünïcödé and tokens, please."}],
        metadata={"user_id": kw.pop("user", MESSAGES_USER[0])},
        stream=stream,
        **kw,
    )
    if stream:
        return [e.model_dump() for e in r]
    return r.model_dump()


def messages_stream_helper(base, key, **kw):
    with an(base, key).messages.stream(
        model=CLAUDE,
        max_tokens=256,
        messages=[{"role": "user", "content": "Tokens, please."}],
        metadata={"user_id": MESSAGES_USER[0]},
        **kw,
    ) as s:
        text = "".join(s.text_stream)
        return text, s.get_final_message().model_dump()


SEARCH = [{"type": "web_search"}]
ANTHROPIC_SEARCH = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]

CASES = {
    "responses.create": lambda b, k: responses_create(b, k, False),
    "responses.create with web search and cached input": lambda b, k: responses_create(
        b,
        k,
        False,
        tools=SEARCH,
        extra_headers={"x-mock-searches": "2", "x-mock-cached": "2", "x-mock-reasoning": "3"},
    ),
    "responses.create(stream=True)": lambda b, k: responses_create(
        b, k, True, extra_headers={"x-mock-chunks": "7"}
    ),
    "responses.create(stream=True), web search, gzip, split reads": lambda b, k: responses_create(
        b,
        k,
        True,
        tools=SEARCH,
        extra_headers={"x-mock-encoding": "gzip", "x-mock-split": "bytes"},
    ),
    "responses.stream()": lambda b, k: responses_stream_helper(b, k),
    "messages.create": lambda b, k: messages_create(b, k, False),
    "messages.create with web search and cache reads and writes": lambda b, k: messages_create(
        b,
        k,
        False,
        tools=ANTHROPIC_SEARCH,
        extra_headers={"x-mock-cached": "3", "x-mock-cache-write": "2"},
    ),
    "messages.create(stream=True), cumulative deltas": lambda b, k: messages_create(
        b,
        k,
        True,
        extra_headers={"x-mock-deltas": "2", "x-mock-delta-usage": "full", "x-mock-cached": "3"},
    ),
    "messages.stream()": lambda b, k: messages_stream_helper(
        b, k, extra_headers={"x-mock-chunks": "9", "x-mock-crlf": "1"}
    ),
    "messages.stream() with web search, gzip": lambda b, k: messages_stream_helper(
        b, k, tools=ANTHROPIC_SEARCH, extra_headers={"x-mock-encoding": "gzip"}
    ),
}


def main():
    direct, proxy, key, capped_key, capped = sys.argv[1:6]
    if len(sys.argv) > 6:
        MESSAGES_USER[0] = sys.argv[6]
    passed = failed = 0
    for case, run in CASES.items():
        a, b = run(direct, "sk-direct"), run(proxy, key)
        ok = a == b and a not in (None, [], {}, ())
        print(("ok   " if ok else "FAIL ") + case)
        if not ok:
            print("  direct:", a)
            print("  proxy: ", b)
        passed += ok
        failed += not ok
    # Over the cap: each SDK raises its own rate-limit error, parsed from tokentap's answer.
    for name, call, want in [
        (
            "responses over budget",
            lambda: responses_create(proxy, capped_key, False, user=capped),
            openai.RateLimitError,
        ),
        (
            "messages over budget",
            lambda: messages_create(proxy, capped_key, False, user=capped),
            anthropic.RateLimitError,
        ),
    ]:
        try:
            call()
            ok, got = False, "nothing raised"
        except Exception as e:
            ok = isinstance(e, want) and e.response.headers.get("retry-after") is not None
            got = f"{type(e).__name__}: {e}"
        print(("ok   " if ok else "FAIL ") + f"{name} -> {got}")
        passed += ok
        failed += not ok
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
