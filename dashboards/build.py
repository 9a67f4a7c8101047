#!/usr/bin/env python3
"""Writes the Grafana dashboards in this directory (run it after editing; commit both).

Every panel has a description and a unit; every query uses the `datasource`, `model` and `user`
variables where they apply. tests/dashboards.rs runs every query against a real Prometheus.
"""

import json
import pathlib

SEL = 'model=~"$model",user=~"$user"'
MSEL = 'gen_ai_request_model=~"$model"'
RI = "$__rate_interval"


def target(expr, legend="", ref="A", instant=False):
    t = {"datasource": {"type": "prometheus", "uid": "${datasource}"}, "expr": expr,
         "legendFormat": legend or "__auto", "refId": ref, "range": not instant, "instant": instant}
    return t


def panel(title, desc, unit, targets, kind="timeseries", w=12, h=8, extra=None):
    p = {
        "type": kind, "title": title, "description": desc,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {}, "targets": targets, "gridPos": {"w": w, "h": h},
    }
    if kind == "timeseries":
        p["fieldConfig"]["defaults"]["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10}
        p["options"] = {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
    if extra:
        p.update(extra)
    return p


def layout(panels):
    x = y = 0
    row_h = 0
    for i, p in enumerate(panels):
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if x + w > 24:
            x, y = 0, y + row_h
            row_h = 0
        p["gridPos"].update({"x": x, "y": y})
        p["id"] = i + 1
        x += w
        row_h = max(row_h, h)
    return panels


def variables():
    ds = {"type": "prometheus", "uid": "${datasource}"}
    return {"list": [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1},
        {"name": "model", "label": "Model", "type": "query", "datasource": ds,
         "definition": "label_values(tokentap_requests_total, model)",
         "query": {"query": "label_values(tokentap_requests_total, model)", "refId": "model"},
         "includeAll": True, "multi": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"},
         "refresh": 2, "sort": 1, "hide": 0},
        {"name": "user", "label": "User", "type": "query", "datasource": ds,
         "definition": 'label_values(tokentap_requests_total{model=~"$model"}, user)',
         "query": {"query": 'label_values(tokentap_requests_total{model=~"$model"}, user)', "refId": "user"},
         "includeAll": True, "multi": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"},
         "refresh": 2, "sort": 1, "hide": 0},
    ]}


def dashboard(uid, title, desc, panels):
    return {
        "uid": uid, "title": title, "description": desc, "tags": ["tokentap", "llm"],
        "schemaVersion": 39, "version": 1, "editable": True, "graphTooltip": 1,
        "time": {"from": "now-6h", "to": "now"}, "refresh": "30s", "timezone": "",
        "templating": variables(), "annotations": {"list": []}, "links": [],
        "panels": layout(panels),
    }


overview = dashboard("tokentap-overview", "tokentap / Overview",
    "Traffic, errors, tokens, cost, latency and tokentap's own overhead.", [
    panel("Requests per second", "Calls through tokentap, by outcome.", "reqps",
          [target(f'sum by (outcome) (rate(tokentap_requests_total{{{SEL}}}[{RI}]))', "{{outcome}}")]),
    panel("Error rate by outcome", "Share of calls that did not complete: upstream errors, resets, "
          "timeouts, client disconnects and tokentap's own refusals.", "percentunit",
          [target(f'sum by (outcome) (rate(tokentap_requests_total{{{SEL},outcome!="complete"}}[{RI}])) '
                  f'/ ignoring(outcome) group_left sum(rate(tokentap_requests_total{{{SEL}}}[{RI}]))',
                  "{{outcome}}")]),
    panel("Tokens per second by model and type", "Input (uncached), cached input, cache writes, "
          "output (visible) and reasoning tokens; the types are disjoint.", "short",
          [target(f'sum by (model, type) (rate(tokentap_tokens_total{{{SEL}}}[{RI}]))', "{{model}} {{type}}")]),
    panel("Cost per hour", "Spend rate in USD per hour, from the price table.", "currencyUSD",
          [target(f'sum by (model) (rate(tokentap_cost_usd_total{{{SEL}}}[{RI}])) * 3600', "{{model}}")]),
    panel("Time to first token", "p50, p95 and p99 of the time to the first content token of "
          "streamed calls.", "s",
          [target(f'histogram_quantile({q}, sum by (le) (rate(gen_ai_server_time_to_first_token_seconds_bucket{{{MSEL}}}[{RI}])))',
                  f"p{int(q * 100)}", ref) for q, ref in ((0.5, "A"), (0.95, "B"), (0.99, "C"))]),
    panel("Call duration p95 by model", "95th percentile of the whole call as the client saw it.", "s",
          [target(f'histogram_quantile(0.95, sum by (le, gen_ai_request_model) (rate(gen_ai_client_operation_duration_seconds_bucket{{{MSEL}}}[{RI}])))',
                  "{{gen_ai_request_model}}")]),
    panel("In flight", "Calls in progress and streamed responses being relayed, now.", "short",
          [target("sum(tokentap_requests_in_flight)", "calls"),
           target("sum(tokentap_streams_active)", "streams", "B")]),
    panel("tokentap overhead p99", "99th percentile of the time tokentap itself spends per call "
          "(its request, response and recording work), excluding the upstream.", "s",
          [target(f'histogram_quantile(0.99, sum by (le) (rate(tokentap_overhead_seconds_bucket[{RI}])))', "p99")]),
    panel("Calls per second by API", "Metered calls by the API the client spoke: chat_completions, "
          "responses (Codex CLI, the Agents SDK), messages (Claude Code, the anthropic SDK), "
          "embeddings, completions.", "reqps",
          [target(f'sum by (api) (rate(tokentap_requests_total{{{SEL},api!=""}}[{RI}]))', "{{api}}")]),
    panel("Unmetered requests per second", "Requests no metered API serves (listing models, files, "
          "batches, ...), forwarded without metering or caps, by method and path class. "
          "`limits.unmetered = \"refuse\"` answers them 404 instead.", "reqps",
          [target(f'sum by (method, path_class) (rate(tokentap_unmetered_requests_total[{RI}]))',
                  "{{method}} {{path_class}}")]),
    panel("Upstream errors", "Calls the upstream failed, by kind: error status, unreachable, reset, timeout.",
          "reqps", [target(f'sum by (kind) (rate(tokentap_upstream_errors_total[{RI}]))', "{{kind}}")], w=24),
    panel("Trace spans exported and dropped", "Spans the OTLP collector accepted, and spans dropped "
          "because the queue was full or the collector failed or timed out (calls are never slowed "
          "by the collector; their spans are dropped instead).", "short",
          [target(f'sum(rate(tokentap_spans_exported_total[{RI}]))', "exported"),
           target(f'sum by (reason) (rate(tokentap_spans_dropped_total[{RI}]))', "dropped {{reason}}", "B")],
          w=24),
])

spend = dashboard("tokentap-spend", "tokentap / Spend",
    "Who spends what on which model, web searches, and how much of it is estimated.", [
    panel("Cost in range by user and model", "USD spent in the selected time range, from "
          "Prometheus counters (increase() misses the first calls of a series that starts inside "
          "the range: for exact figures use `tokentap spend` or the ledger).", "currencyUSD",
          [dict(target(f'sum by (user, model) (increase(tokentap_cost_usd_total{{{SEL}}}[$__range]))',
                       "{{user}} {{model}}", instant=True), format="table")], kind="table", w=12,
          extra={"transformations": [{"id": "organize", "options": {"excludeByName": {"Time": True}}}]}),
    panel("Top users", "The ten users with the highest spend in the selected time range.", "currencyUSD",
          [target(f'topk(10, sum by (user) (increase(tokentap_cost_usd_total{{{SEL}}}[$__range])))',
                  "{{user}}", instant=True)], kind="bargauge", w=12,
          extra={"options": {"orientation": "horizontal", "displayMode": "gradient"}}),
    panel("Cost in range by API", "USD spent in the selected time range by the API the client "
          "spoke (chat_completions, responses, messages, embeddings, completions).", "currencyUSD",
          [target(f'sum by (api) (increase(tokentap_cost_usd_total{{{SEL},api!=""}}[$__range]))',
                  "{{api}}", instant=True)], kind="bargauge", w=12,
          extra={"options": {"orientation": "horizontal", "displayMode": "gradient"}}),
    panel("Cost per hour by API", "Spend rate in USD per hour, by API.", "currencyUSD",
          [target(f'sum by (api) (rate(tokentap_cost_usd_total{{{SEL},api!=""}}[{RI}])) * 3600', "{{api}}")]),
    panel("Cost per hour by model", "Spend rate in USD per hour.", "currencyUSD",
          [target(f'sum by (model) (rate(tokentap_cost_usd_total{{{SEL}}}[{RI}])) * 3600', "{{model}}")]),
    panel("Total spend in range", "USD spent in the selected time range, all selected users and models.",
          "currencyUSD", [target(f'sum(increase(tokentap_cost_usd_total{{{SEL}}}[$__range]))', "total", instant=True)],
          kind="stat", w=6),
    panel("Web searches in range", "Searches the upstream ran (and bills) in the selected time range.",
          "short", [target(f'sum(increase(tokentap_web_searches_total{{{SEL}}}[$__range]))', "searches", instant=True)],
          kind="stat", w=6),
    panel("Web searches per second by model", "Rate of searches the upstream ran.", "short",
          [target(f'sum by (model) (rate(tokentap_web_searches_total{{{SEL}}}[{RI}]))', "{{model}}")]),
    panel("Estimated-usage share", "Share of chat calls, since tokentap started, whose usage was "
          "estimated because they were cut off before the upstream reported it. High values mean "
          "spend is less certain.", "percentunit",
          [target('sum(tokentap_usage_estimated_total{model=~"$model",model!=""}) / '
                  'sum(tokentap_requests_total{model=~"$model",model!=""})',
                  "estimated", instant=True)], kind="stat", w=6),
    panel("Tokens in range by type", "Tokens in the selected time range, by disjoint type.", "short",
          [target(f'sum by (type) (increase(tokentap_tokens_total{{{SEL}}}[$__range]))', "{{type}}", instant=True)],
          kind="bargauge", w=6, extra={"options": {"orientation": "horizontal", "displayMode": "basic"}}),
])

USEL = 'user=~"$user"'
budgets = dashboard("tokentap-budgets", "tokentap / Budgets",
    "Per-user caps: who is being refused, how much of each window is spent, who is closest to "
    "the cap, and whether the ledger keeps up.", [
    panel("Budget refusals per second by reason", "Calls refused before the upstream saw them: "
          "over a USD cap, over a token cap, or without the required user.", "reqps",
          [target(f'sum by (reason) (rate(tokentap_budget_rejections_total{{{USEL}}}[{RI}]))', "{{reason}}")]),
    panel("Refusals by user and team", "Refused calls since tokentap started, by user, team (empty "
          "when the user's own cap refused) and reason.", "short",
          [dict(target(f'sum by (user, team, reason) (tokentap_budget_rejections_total{{{USEL}}})',
                       "{{user}} {{team}} {{reason}}", instant=True), format="table")], kind="table",
          extra={"transformations": [{"id": "organize", "options": {"excludeByName": {"Time": True}}}]}),
    panel("Spend in the current window", "USD spent so far in each capped user's current window "
          "(from the ledger, exact).", "currencyUSD",
          [target(f'tokentap_budget_spend_usd{{{USEL}}}', "{{user}} {{window}}")]),
    panel("Remaining under the cap", "USD left before each capped user's hard cap, per window.",
          "currencyUSD", [target(f'tokentap_budget_remaining_usd{{{USEL}}}', "{{user}} {{window}}")]),
    panel("Closest to their cap", "The ten capped users with the least budget left.", "currencyUSD",
          [target(f'bottomk(10, tokentap_budget_remaining_usd{{{USEL}}})', "{{user}} {{window}}", instant=True)],
          kind="bargauge", extra={"options": {"orientation": "horizontal", "displayMode": "gradient"}}),
    panel("Soft thresholds passed", "Times settled spend passed a soft threshold (a warning, not a "
          "refusal), by user or team and window, since tokentap started.", "short",
          [dict(target(f'sum by (user, team, window) (tokentap_budget_soft_threshold_crossed_total{{{USEL}}})',
                       "{{user}} {{team}} {{window}}", instant=True), format="table")], kind="table",
          extra={"transformations": [{"id": "organize", "options": {"excludeByName": {"Time": True}}}]}),
    panel("Rate-limited calls per second", "Calls refused by a rate limit ([budgets.limits]) before "
          "the upstream saw them, by user and limit (requests_per_minute, tokens_per_minute, "
          "concurrent).", "reqps",
          [target(f'sum by (user, limit) (rate(tokentap_rate_limited_total{{{USEL}}}[{RI}]))',
                  "{{user}} {{limit}}")]),
    panel("Budget alerts in range", "Alerts raised (a threshold of a cap passed: 0.8, 1, soft, ...) "
          "and their delivery to the webhooks: delivered, or failed rounds (retried).", "short",
          [target('sum by (threshold, outcome) (increase(tokentap_budget_alerts_total[$__range]))',
                  "{{threshold}} {{outcome}}", instant=True)],
          kind="bargauge", extra={"options": {"orientation": "horizontal", "displayMode": "basic"}}),
    panel("Ledger errors in range", "Times the ledger could not persist spend or reach its store. "
          "Anything above zero needs attention: budgets may be enforced on stale figures.", "short",
          [target('sum(increase(tokentap_ledger_errors_total[$__range]))', "errors", instant=True)],
          kind="stat"),
])

here = pathlib.Path(__file__).parent
for name, d in (("tokentap-overview.json", overview), ("tokentap-spend.json", spend),
                ("tokentap-budgets.json", budgets)):
    (here / name).write_text(json.dumps(d, indent=2) + "\n")
    print("wrote", here / name)
