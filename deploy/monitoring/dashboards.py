#!/usr/bin/env python3
"""Writes the Grafana dashboards in deploy/monitoring/dashboards/ from the panel lists below.

    python3 deploy/monitoring/dashboards.py          # rewrite the JSON files, then lint them
    python3 deploy/monitoring/dashboards.py --check  # exit 1 if a file differs or fails the
                                                     # lint (deploy/validate runs this)

The JSON is what Grafana loads (sidecar ConfigMaps, compose provisioning, manual import); this
script keeps the ~60 panels consistent (datasource, units, layout, job selectors) and is the
place to change them. Queries use the metrics exactly as the services export them, plus only the
`job` and `instance` labels Prometheus adds itself: no relabelling is assumed. The job names are
the custom variables `auth_job` and `referral_job`, so a scrape config with other job names only
needs another default.
"""

import json
import pathlib
import re
import sys

OUT = pathlib.Path(__file__).resolve().parent / "dashboards"

AUTH = 'job=~"$auth_job"'
REFERRAL = 'job=~"$referral_job"'
BOTH = 'job=~"$auth_job|$referral_job"'
# The codes a caller cannot cause by sending something wrong: the alert RefsysGrpcServerErrorRate
# counts the same ones.
SERVER_CODES = 'grpc_code=~"Unknown|Internal|Unavailable|DeadlineExceeded|DataLoss|Unimplemented"'
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def target(expr, legend):
    return {"expr": expr, "legendFormat": legend}


def timeseries(title, description, unit, targets, width=12, stack=False, fill=10, many=False):
    """`many`: one series per label value, most of them usually 0 (every code, every limit is
    exported from the start): a legend table sorted by the largest value puts the ones that
    moved on top."""
    custom = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": fill, "showPoints": "never",
              "spanNulls": False}
    if stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    legend = {"displayMode": "list", "placement": "bottom", "showLegend": True}
    if many:
        legend = {"displayMode": "table", "placement": "bottom", "showLegend": True,
                  "calcs": ["max", "lastNotNull"], "sortBy": "Max", "sortDesc": True}
    return {
        "type": "timeseries", "title": title, "description": description, "width": width,
        "height": 8, "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit, "custom": custom}, "overrides": []},
        "options": {"legend": legend, "tooltip": {"mode": "multi", "sort": "desc"}},
    }


def stat(title, description, unit, targets, width=6, thresholds=None):
    steps = thresholds or [{"color": "green", "value": None}]
    return {
        "type": "stat", "title": title, "description": description, "width": width,
        "height": 4, "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit, "thresholds": {"mode": "absolute",
                                                                   "steps": steps}},
                        "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "area", "textMode": "auto",
                    "orientation": "auto", "justifyMode": "auto"},
    }


def row(title):
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


# A value of 0 is red, 1 or more green: pods up, stores up.
ZERO_RED = [{"color": "red", "value": None}, {"color": "green", "value": 1}]


def rpc_panels(job, name):
    """RPC rate, errors by code and latency per method of one service."""
    return [
        row(f"{name}: gRPC"),
        timeseries("Calls per method",
                   f"Completed gRPC calls per second, by method, summed over every {name} pod "
                   "(grpc_server_handled_total).",
                   "reqps",
                   [target(f"sum by (grpc_method) (rate(grpc_server_handled_total{{{job}}}"
                           "[$__rate_interval]))", "{{grpc_method}}")], stack=True),
        timeseries("Errors by code",
                   "Calls per second that ended with a status other than OK, by gRPC code. "
                   "InvalidArgument, NotFound, ResourceExhausted (limits) and Unauthenticated "
                   "are callers' mistakes or refusals; Unavailable, Internal, DeadlineExceeded "
                   "and Unknown are ours (they feed RefsysGrpcServerErrorRate).",
                   "reqps",
                   [target(f"sum by (grpc_code) (rate(grpc_server_handled_total{{{job}, "
                           'grpc_code!="OK"}[$__rate_interval]))', "{{grpc_code}}")],
                   stack=True, many=True),
        timeseries("p50 latency per method",
                   "Median time from receiving a call to sending its response headers, by "
                   "method (grpc_server_handling_seconds; buckets from 0.5 ms to 10 s).",
                   "s",
                   [target("histogram_quantile(0.5, sum by (grpc_method, le) (rate("
                           f"grpc_server_handling_seconds_bucket{{{job}}}[$__rate_interval])))",
                           "{{grpc_method}}")], fill=0),
        timeseries("p99 latency per method",
                   "99th percentile of the handling time, by method. RefsysGrpcLatencyP99High "
                   "warns above 0.5 s for 10 minutes.",
                   "s",
                   [target("histogram_quantile(0.99, sum by (grpc_method, le) (rate("
                           f"grpc_server_handling_seconds_bucket{{{job}}}[$__rate_interval])))",
                           "{{grpc_method}}")], fill=0),
        timeseries("Server error ratio",
                   "Share of calls per method that failed on the server side (Unknown, "
                   "Internal, Unavailable, DeadlineExceeded, DataLoss, Unimplemented). The "
                   "page RefsysGrpcServerErrorRate fires above 2% for 5 minutes.",
                   "percentunit",
                   [target(f"sum by (grpc_method) (rate(grpc_server_handled_total{{{job}, "
                           f"{SERVER_CODES}}}[$__rate_interval])) / sum by (grpc_method) ("
                           f"rate(grpc_server_handled_total{{{job}}}[$__rate_interval]))",
                           "{{grpc_method}}")], fill=0),
    ]


def pod_panels(job, name, store):
    """Pods scraped and up, their store, calls in flight."""
    return [
        row(f"{name}: pods"),
        stat("Pods up",
             f"{name} pods whose /metrics Prometheus scraped successfully at the last scrape "
             "(sum of `up`), next to the number of pods it knows of (count of `up`).",
             "none",
             [target(f"sum(up{{{job}}})", "up"), target(f"count(up{{{job}}})", "known")],
             thresholds=ZERO_RED),
        stat(f"Pods with {store} up",
             f"{name} pods whose readiness check reaches {store} (sum of refsys_store_up). A "
             "pod without its store is NOT_SERVING and out of its Service; RefsysStoreDown "
             "pages after 1 minute.",
             "none",
             [target(f"sum(refsys_store_up{{{job}}})", "store up")], thresholds=ZERO_RED),
        stat("Calls in flight",
             f"gRPC calls being handled right now over every {name} pod "
             "(grpc_server_in_flight). MAX_CONCURRENT_REQUESTS caps each pod at 1024; "
             "RefsysInFlightHigh warns above 800 on one pod.",
             "none",
             [target(f"sum(grpc_server_in_flight{{{job}}})", "in flight")]),
        stat("Calls per second",
             f"Completed gRPC calls per second over every {name} pod.",
             "reqps",
             [target(f"sum(rate(grpc_server_handled_total{{{job}}}[$__rate_interval]))",
                     "calls/s")]),
        timeseries("Store up per pod",
                   f"1 while the pod's readiness check reaches {store}, 0 while it does not "
                   "(refsys_store_up, checked every few seconds).",
                   "none",
                   [target(f"refsys_store_up{{{job}}}", "{{instance}}")], fill=0),
        timeseries("Calls in flight per pod",
                   "gRPC calls being handled per pod (grpc_server_in_flight); a pod far above "
                   "the others is slow or gets more than its share.",
                   "none",
                   [target(f"sum by (instance) (grpc_server_in_flight{{{job}}})",
                           "{{instance}}")], fill=0),
    ]


def overview():
    return "refsys-overview", "refsys: overview", [
        row("Health"),
        stat("auth-service pods up",
             "auth-service pods Prometheus scraped successfully (sum of `up`).",
             "none", [target(f"sum(up{{{AUTH}}})", "pods")], thresholds=ZERO_RED),
        stat("referral-service pods up",
             "referral-service pods Prometheus scraped successfully (sum of `up`).",
             "none", [target(f"sum(up{{{REFERRAL}}})", "pods")], thresholds=ZERO_RED),
        stat("Pods with their store up",
             "Pods whose readiness check reaches their store (Redis for auth-service, "
             "Postgres for referral-service), by job (sum of refsys_store_up).",
             "none", [target(f"sum by (job) (refsys_store_up{{{BOTH}}})", "{{job}}")],
             thresholds=ZERO_RED),
        stat("Calls in flight",
             "gRPC calls being handled right now, by job (grpc_server_in_flight).",
             "none", [target(f"sum by (job) (grpc_server_in_flight{{{BOTH}}})", "{{job}}")]),
        row("Traffic"),
        timeseries("Calls per second",
                   "Completed gRPC calls per second, by job (grpc_server_handled_total).",
                   "reqps",
                   [target(f"sum by (job) (rate(grpc_server_handled_total{{{BOTH}}}"
                           "[$__rate_interval]))", "{{job}}")]),
        timeseries("Server error ratio",
                   "Share of calls that failed on the server side (Unknown, Internal, "
                   "Unavailable, DeadlineExceeded, DataLoss, Unimplemented), by job.",
                   "percentunit",
                   [target(f"sum by (job) (rate(grpc_server_handled_total{{{BOTH}, "
                           f"{SERVER_CODES}}}[$__rate_interval])) / sum by (job) ("
                           f"rate(grpc_server_handled_total{{{BOTH}}}[$__rate_interval]))",
                           "{{job}}")], fill=0),
        timeseries("p99 latency",
                   "99th percentile of the handling time over every method, by job.",
                   "s",
                   [target("histogram_quantile(0.99, sum by (job, le) (rate("
                           f"grpc_server_handling_seconds_bucket{{{BOTH}}}[$__rate_interval])))",
                           "{{job}}")], fill=0),
        timeseries("Errors by code",
                   "Calls per second with a status other than OK, by job and gRPC code.",
                   "reqps",
                   [target(f"sum by (job, grpc_code) (rate(grpc_server_handled_total{{{BOTH}, "
                           'grpc_code!="OK"}[$__rate_interval]))', "{{job}} {{grpc_code}}")],
                   many=True),
        row("Sign-ins and referrals"),
        timeseries("Codes sent and verified",
                   "Sign-in codes handed to the SMS provider, codes verified, and sends the SMS "
                   "provider did not take, per second.",
                   "ops",
                   [target(f"sum(rate(refsys_otp_codes_sent_total{{{AUTH}}}[$__rate_interval]))",
                           "sent"),
                    target("sum(rate(refsys_otp_verifications_total{"
                           f'{AUTH}, outcome="success"}}[$__rate_interval]))', "verified"),
                    target(f"sum(rate(refsys_sms_failures_total{{{AUTH}}}[$__rate_interval]))",
                           "SMS failed")], fill=0),
        timeseries("Limits hit",
                   "Requests refused by a limit per second, by limit (refsys_otp_limit_refusals"
                   "_total; the label is the ErrorInfo reason in lower case).",
                   "ops",
                   [target("sum by (limit) (rate(refsys_otp_limit_refusals_total{"
                           f"{AUTH}}}[$__rate_interval]))", "{{limit}}")], stack=True,
                   many=True),
        timeseries("Activations and points",
                   "Invite codes activated per second, and points granted and redeemed per "
                   "second (sums of the amounts).",
                   "ops",
                   [target("sum(rate(refsys_invite_activations_total{"
                           f"{REFERRAL}}}[$__rate_interval]))", "activations"),
                    target(f"sum(rate(refsys_points_granted_total{{{REFERRAL}}}"
                           "[$__rate_interval]))", "points granted"),
                    target(f"sum(rate(refsys_points_redeemed_total{{{REFERRAL}}}"
                           "[$__rate_interval]))", "points redeemed")], fill=0),
        row("Stores"),
        timeseries("Redis errors",
                   "auth-service's Redis calls that failed, per second, by kind: unavailable "
                   "(callers hear UNAVAILABLE) or corrupt (a bug: INTERNAL).",
                   "ops",
                   [target(f"sum by (kind) (rate(refsys_redis_errors_total{{{AUTH}}}"
                           "[$__rate_interval]))", "{{kind}}")], stack=True),
        timeseries("Postgres pool in use",
                   "Share of referral-service's Postgres pool connections in use, over all "
                   "pods (the referral-service dashboard has it per pod, and the waits that "
                   "timed out).",
                   "percentunit",
                   [target("sum(refsys_db_pool_connections{"
                           f'{REFERRAL}, state="in_use"}}) / sum('
                           f"refsys_db_pool_max_connections{{{REFERRAL}}})", "in use")],
                   fill=0),
    ]


def auth():
    return "refsys-auth-service", "refsys: auth-service", [
        *pod_panels(AUTH, "auth-service", "Redis"),
        *rpc_panels(AUTH, "auth-service"),
        row("Sign-in codes and SMS"),
        timeseries("SMS sent and failed",
                   "Sign-in codes handed to the SMS provider per second "
                   "(refsys_otp_codes_sent_total), and sends the provider did not take or did "
                   "not answer in time (refsys_sms_failures_total; RefsysSmsFailures pages "
                   "above 5%).",
                   "ops",
                   [target(f"sum(rate(refsys_otp_codes_sent_total{{{AUTH}}}[$__rate_interval]))",
                           "sent"),
                    target(f"sum(rate(refsys_sms_failures_total{{{AUTH}}}[$__rate_interval]))",
                           "failed")], fill=0),
        timeseries("Verifications by outcome",
                   "VerifyCode outcomes per second: success, wrong, expired (no code pending), "
                   "busy, locked, invalid, unavailable, error.",
                   "ops",
                   [target("sum by (outcome) (rate(refsys_otp_verifications_total{"
                           f"{AUTH}}}[$__rate_interval]))", "{{outcome}}")], stack=True,
                   many=True),
        timeseries("SMS sends per region",
                   "Codes delivered to the SMS provider per second, by the number's region "
                   "(ISO 3166; 001 = none). A region rising alone is the first sign of SMS "
                   "pumping.",
                   "ops",
                   [target("sum by (region) (rate(refsys_sms_region_sends_total{"
                           f"{AUTH}}}[$__rate_interval]))", "{{region}}")], stack=True),
        timeseries("Conversion per region (1 h)",
                   "Codes verified / codes sent over the last hour, by region: real users "
                   "type most of their codes in, pumped numbers never do. The fraud guard "
                   "trips below SMS_FRAUD_MIN_CONVERSION (0.2) after SMS_FRAUD_MIN_SENDS; "
                   "RefsysSmsRegionConversionLow warns below 0.2 with more than 50 sends.",
                   "percentunit",
                   [target("sum by (region) (increase(refsys_sms_region_verifications_total{"
                           f"{AUTH}}}[1h])) / sum by (region) (increase("
                           f"refsys_sms_region_sends_total{{{AUTH}}}[1h]))", "{{region}}")],
                   fill=0),
        stat("Fraud guard mode",
             "Pods per SMS_FRAUD_GUARD mode (refsys_sms_fraud_guard_mode): off, monitor (trips "
             "are counted and alerted) or enforce (a tripped region's sends are suspended for "
             "SMS_FRAUD_BLOCK_SECONDS). Pods disagreeing means a rollout is under way.",
             "none",
             [target(f"sum by (mode) (refsys_sms_fraud_guard_mode{{{AUTH}}})", "{{mode}}")],
             width=8),
        stat("Sends the fraud guard refused",
             "SendCode calls refused over the dashboard's time range because the guard "
             "suspended the number's region (enforce mode; limit sms_fraud_suspected).",
             "none",
             [target("sum(increase(refsys_otp_limit_refusals_total{"
                     f'{AUTH}, limit="sms_fraud_suspected"}}[$__range]))', "refused")],
             width=8),
        stat("Fraud guard trips",
             "Times the conversion guard tripped over the dashboard's time range, by region "
             "and mode (refsys_sms_fraud_suspected_total; counted once per block period). Any "
             "trip pages (RefsysSmsFraudSuspected). Shows no data until the first trip.",
             "none",
             # A region's first trip in a pod creates its series at 1, which increase() reads
             # as 0: a series born within the range counts with its whole value (+ 0 drops the
             # metric name, so `or` matches it against increase()'s series).
             [target("sum by (region, mode) ((refsys_sms_fraud_suspected_total{"
                     f"{AUTH}}} unless refsys_sms_fraud_suspected_total{{{AUTH}}} offset "
                     "$__range) + 0 or increase(refsys_sms_fraud_suspected_total{"
                     f"{AUTH}}}[$__range]))", "{{region}} ({{mode}})")],
             width=8),
        row("Limits"),
        timeseries("Limits hit by kind",
                   "Requests refused per second, by limit (the ErrorInfo reason in lower case): "
                   "resend_cooldown, phone/client send limits, the SMS budgets (global, region, "
                   "prefix), sms_fraud_suspected, the failure caps and the service-token limits.",
                   "ops",
                   [target("sum by (limit) (rate(refsys_otp_limit_refusals_total{"
                           f"{AUTH}}}[$__rate_interval]))", "{{limit}}")], stack=True,
                   many=True),
        timeseries("Numbers refused by policy",
                   "SendCode calls refused because of the number's region (SMS_ALLOWED_REGIONS) "
                   "or type (no SMS sent, no limit counted), per second.",
                   "ops",
                   [target("sum by (reason) (rate(refsys_sms_policy_refusals_total{"
                           f"{AUTH}}}[$__rate_interval]))", "{{reason}}")], stack=True,
                   many=True),
        row("Sessions and service tokens"),
        timeseries("Refresh tokens",
                   "Refresh tokens rotated, retries answered with the same pair within the "
                   "grace period, and reuses of already-rotated tokens (their families are "
                   "revoked; RefsysRefreshTokenReuse warns above 10 in 15 minutes), per second.",
                   "ops",
                   [target(f"sum(rate(refsys_refresh_tokens_rotated_total{{{AUTH}}}"
                           "[$__rate_interval]))", "rotated"),
                    target(f"sum(rate(refsys_refresh_tokens_replayed_total{{{AUTH}}}"
                           "[$__rate_interval]))", "replayed"),
                    target(f"sum(rate(refsys_refresh_token_reuse_total{{{AUTH}}}"
                           "[$__rate_interval]))", "reused (family revoked)")], fill=0),
        timeseries("Service tokens",
                   "Service tokens issued per second by client id, and IssueServiceToken "
                   "refusals by reason.",
                   "ops",
                   [target("sum by (client) (rate(refsys_service_tokens_issued_total{"
                           f"{AUTH}}}[$__rate_interval]))", "issued {{client}}"),
                    target("sum by (reason) (rate(refsys_service_token_refusals_total{"
                           f"{AUTH}}}[$__rate_interval]))", "refused {{reason}}")], fill=0),
        row("Redis"),
        timeseries("Redis errors",
                   "Redis calls that failed per second (refsys_redis_errors_total): "
                   "unavailable = refused, dropped or not answered within the call timeout "
                   "(the caller hears UNAVAILABLE); corrupt = a reply only a bug explains "
                   "(INTERNAL). Readiness pings count too.",
                   "ops",
                   [target(f"sum by (kind) (rate(refsys_redis_errors_total{{{AUTH}}}"
                           "[$__rate_interval]))", "{{kind}}")], stack=True),
        timeseries("Redis errors per pod",
                   "Failed Redis calls per second per pod: one pod alone points at its "
                   "network path or its connection, all pods at Redis itself.",
                   "ops",
                   [target(f"sum by (instance) (rate(refsys_redis_errors_total{{{AUTH}}}"
                           "[$__rate_interval]))", "{{instance}}")], fill=0),
    ]


def referral():
    return "refsys-referral-service", "refsys: referral-service", [
        *pod_panels(REFERRAL, "referral-service", "Postgres"),
        *rpc_panels(REFERRAL, "referral-service"),
        row("Referrals and points"),
        timeseries("Invite codes activated",
                   "Invite codes activated per second, through ActivateInviteCode or at "
                   "sign-in (refsys_invite_activations_total).",
                   "ops",
                   [target("sum(rate(refsys_invite_activations_total{"
                           f"{REFERRAL}}}[$__rate_interval]))", "activations")]),
        timeseries("Points granted and redeemed",
                   "Points moved per second (the sums of the amounts; retries answered from a "
                   "stored result are not counted).",
                   "short",
                   [target(f"sum(rate(refsys_points_granted_total{{{REFERRAL}}}"
                           "[$__rate_interval]))", "granted"),
                    target(f"sum(rate(refsys_points_redeemed_total{{{REFERRAL}}}"
                           "[$__rate_interval]))", "redeemed")], fill=0),
        timeseries("Points requests refused",
                   "RedeemPoints / GrantPoints refused per second, by kind and reason "
                   "(insufficient_points, idempotency_key_reused, invalid_argument, "
                   "not_found).",
                   "ops",
                   [target("sum by (kind, reason) (rate(refsys_points_refusals_total{"
                           f"{REFERRAL}}}[$__rate_interval]))", "{{kind}} {{reason}}")],
                   stack=True, many=True),
        timeseries("Points retries replayed",
                   "RedeemPoints / GrantPoints retries answered with the stored result of "
                   "their idempotency key, per second, by kind.",
                   "ops",
                   [target("sum by (kind) (rate(refsys_points_replays_total{"
                           f"{REFERRAL}}}[$__rate_interval]))", "{{kind}}")], stack=True),
        row("Postgres pool"),
        timeseries("Pool connections",
                   "Postgres pool connections in use and idle, summed over the pods, against "
                   "their limit (DATABASE_MAX_CONNECTIONS per pod). Updated with each "
                   "readiness check.",
                   "none",
                   [target("sum by (state) (refsys_db_pool_connections{"
                           f"{REFERRAL}}})", "{{state}}"),
                    target(f"sum(refsys_db_pool_max_connections{{{REFERRAL}}})", "limit")],
                   fill=0),
        timeseries("Pool use per pod",
                   "Share of each pod's pool in use. RefsysDbPoolSaturated warns above 90% for "
                   "10 minutes.",
                   "percentunit",
                   [target("sum by (instance) (refsys_db_pool_connections{"
                           f'{REFERRAL}, state="in_use"}}) / sum by (instance) ('
                           f"refsys_db_pool_max_connections{{{REFERRAL}}})", "{{instance}}")],
                   fill=0),
        timeseries("Pool waits that timed out",
                   "Requests that waited for a pool connection longer than "
                   "DATABASE_ACQUIRE_TIMEOUT_SECONDS, per second, by pod "
                   "(refsys_db_pool_timeouts_total; the caller hears UNAVAILABLE). Anything "
                   "above zero means the pool is too small for the load or queries are slow.",
                   "ops",
                   [target("sum by (instance) (rate(refsys_db_pool_timeouts_total{"
                           f"{REFERRAL}}}[$__rate_interval]))", "{{instance}}")], fill=0),
    ]


def layout(panels):
    """Grafana's gridPos: 24 columns, panels left to right, rows across the whole width."""
    out, x, y, line_height, next_id = [], 0, 0, 0, 1
    for panel in panels:
        panel = dict(panel)
        width = 24 if panel["type"] == "row" else panel.pop("width")
        height = 1 if panel["type"] == "row" else panel.pop("height")
        if x + width > 24 or panel["type"] == "row":
            x, y, line_height = 0, y + line_height, 0
        panel["gridPos"] = {"h": height, "w": width, "x": x, "y": y}
        panel["id"] = next_id
        next_id += 1
        if panel["type"] != "row":
            panel["datasource"] = DATASOURCE
            panel["targets"] = [dict(t, refId=chr(ord("A") + i), datasource=DATASOURCE)
                                for i, t in enumerate(panel["targets"])]
        x, line_height = x + width, max(line_height, height)
        if panel["type"] == "row":
            x, y, line_height = 0, y + height, 0
        out.append(panel)
    return out


def custom_variable(name, label, value):
    return {
        "type": "custom", "name": name, "label": label, "query": value,
        "current": {"selected": True, "text": value, "value": value},
        "options": [{"selected": True, "text": value, "value": value}],
        "hide": 0, "includeAll": False, "multi": False, "skipUrlSync": False,
        "description": "The Prometheus job that scrapes this service's metrics port.",
    }


def dashboard(uid, title, panels):
    return {
        "uid": uid,
        "title": title,
        "tags": ["refsys"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "description": "Generated by deploy/monitoring/dashboards.py; change it there.",
        "links": [{"title": "refsys", "type": "dashboards", "tags": ["refsys"], "asDropdown":
                   False, "includeVars": True, "keepTime": True}],
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": [
            {"type": "datasource", "name": "datasource", "label": "Prometheus",
             "query": "prometheus", "current": {}, "hide": 0, "refresh": 1, "regex": "",
             "includeAll": False, "multi": False, "skipUrlSync": False},
            custom_variable("auth_job", "auth-service job", "auth-service"),
            custom_variable("referral_job", "referral-service job", "referral-service"),
        ]},
        "panels": layout(panels),
    }


def render():
    return {f"{uid}.json": json.dumps(dashboard(uid, title, panels), indent=2) + "\n"
            for uid, title, panels in (overview(), auth(), referral())}


# The only variables a query may use: the job names, and Grafana's own intervals.
ALLOWED_VARIABLES = {"auth_job", "referral_job", "__rate_interval", "__interval", "__range"}


def lint(path):
    """What Grafana and the operators need of a dashboard file, whoever wrote it."""
    problems = []
    try:
        board = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return [f"{path.name}: {err}"]
    variables = {v.get("name"): v for v in board.get("templating", {}).get("list", [])}
    source = variables.get("datasource", {})
    if source.get("type") != "datasource" or source.get("query") != "prometheus":
        problems.append(f"{path.name}: no `datasource` variable of type prometheus")
    for name, default in (("auth_job", "auth-service"), ("referral_job", "referral-service")):
        if variables.get(name, {}).get("query") != default:
            problems.append(f"{path.name}: variable {name} must default to {default}")
    if not board.get("uid") or not board.get("title"):
        problems.append(f"{path.name}: uid and title required")
    panels = list(board.get("panels", []))
    for panel in list(panels):
        panels.extend(panel.get("panels", []))  # a collapsed row keeps its panels inside
    ids = [panel.get("id") for panel in panels]
    if len(ids) != len(set(ids)):
        problems.append(f"{path.name}: panel ids repeat")
    for panel in panels:
        if panel.get("type") == "row":
            continue
        where = f"{path.name}: panel {panel.get('title')!r}"
        if not panel.get("fieldConfig", {}).get("defaults", {}).get("unit"):
            problems.append(f"{where}: no unit (fieldConfig.defaults.unit)")
        if not str(panel.get("description", "")).strip():
            problems.append(f"{where}: no description")
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            problems.append(f"{where}: datasource must be ${{datasource}}")
        if not panel.get("targets"):
            problems.append(f"{where}: no targets")
        for target in panel.get("targets", []):
            expr = str(target.get("expr", "")).strip()
            if not expr:
                problems.append(f"{where}: a target without expr")
                continue
            used = set(re.findall(r"\$\{?(\w+)", expr))
            if used - ALLOWED_VARIABLES:
                problems.append(f"{where}: unknown variables {sorted(used - ALLOWED_VARIABLES)}")
            # Every series is chosen by job, through the variables, never by a fixed name.
            if not re.search(r'job=~"\$(auth|referral)_job', expr):
                problems.append(f"{where}: {expr!r} does not select a job through a variable")
            # A zero stand-in hides a misspelt metric: pre-initialise the series instead.
            if re.search(r"\bvector\s*\(", expr):
                problems.append(f"{where}: {expr!r} uses vector(): an empty panel must stay empty")
    return problems


def main():
    check = "--check" in sys.argv[1:]
    problems = []
    for name, text in render().items():
        path = OUT / name
        if check:
            if not path.is_file() or path.read_text() != text:
                problems.append(f"{path}: differs from its generator (run python3 deploy/monitoring/dashboards.py)")
        else:
            OUT.mkdir(exist_ok=True)
            path.write_text(text)
    for path in sorted(OUT.glob("*.json")):
        problems.extend(lint(path))
    if problems:
        print("\n".join(problems), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
