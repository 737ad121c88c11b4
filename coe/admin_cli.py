"""`coe keys ...` and `coe usage`: manage API keys and read usage of a running coe over HTTP (admin key).

The admin key comes from COE_ADMIN_KEY or the file COE_ADMIN_KEY_FILE names (as for the service), never from
the command line, where other users of the machine could read it.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"


class CliError(Exception):
    """A message for stderr and exit code 1."""


def client_key(explicit: str | None = None) -> str | None:
    """The key a client command sends: --api-key, else COE_API_KEY, else the admin key from the environment."""
    import os

    if explicit:
        return explicit
    if os.environ.get("COE_API_KEY"):
        return os.environ["COE_API_KEY"]
    from coe.config import RuntimeSettings

    return RuntimeSettings().admin_key_value()


def auth_headers(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


def _admin_key() -> str:
    from coe.config import RuntimeSettings

    key = RuntimeSettings().admin_key_value()
    if key is None:
        raise CliError("no admin key: set COE_ADMIN_KEY or COE_ADMIN_KEY_FILE to the running service's admin key")
    return key


def _call(method: str, url: str, path: str, body: Any = None, params: dict[str, str] | None = None) -> Any:
    import httpx

    try:
        r = httpx.request(method, f"{url}{path}", json=body, params=params, timeout=30,
                          headers=auth_headers(_admin_key()))
    except httpx.HTTPError as err:
        raise CliError(f"coe is not reachable at {url}: {err}") from None
    try:
        data = r.json()
    except ValueError:
        data = None
    if r.status_code != 200:
        msg = (data or {}).get("error", {}).get("message") if isinstance(data, dict) else None
        raise CliError(f"{r.status_code}: {msg or r.text[:200]}")
    return data


def _date(value: str) -> str:
    """--expires: an ISO date or datetime (UTC unless it names a zone)."""
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not an ISO date (YYYY-MM-DD or YYYY-MM-DDTHH:MM)") from None
    return value


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")


def cmd_keys_create(args: argparse.Namespace) -> int:
    if args.period is not None and args.budget_usd is None:
        raise CliError("--period needs --budget-usd")
    body: dict[str, Any] = {"team": args.team}
    for k in ("rpm", "tpm", "budget_usd", "period"):
        if getattr(args, k) is not None:
            body[k] = getattr(args, k)
    if args.experts:
        body["experts"] = [e.strip() for e in args.experts.split(",") if e.strip()]
    if args.expires:
        body["expires_at"] = args.expires
    out = _call("POST", args.url, "/v1/coe/keys", body)
    if args.json:
        print(json.dumps({"id": out["id"], "key": out["key"], "team": out["team"]}))
    else:
        print(out["key"])
        print(f"created {out['id']} for team '{out['team']}': the key is shown once; store it now", file=sys.stderr)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    data = _call("GET", args.url, "/v1/coe/keys")["data"]
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"{'id':<18}{'team':<16}{'status':<9}{'created (UTC)':<18}{'expires':<18}{'rpm':>7}{'tpm':>9}"
          f"{'budget':>12}  {'hash':<10}experts")
    for k in data:
        budget = f"${k['budget_usd']:g}/{k['period']}" if k.get("budget_usd") is not None else "-"
        print(f"{k['id']:<18}{k['team']:<16}{k['status']:<9}{_when(k['created_at']):<18}{_when(k['expires_at']):<18}"
              f"{k['rpm'] or '-':>7}{k['tpm'] or '-':>9}{budget:>12}  {k['hash_prefix']:<10}"
              f"{','.join(k['experts']) if k['experts'] else 'all'}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    out = _call("DELETE", args.url, f"/v1/coe/keys/{args.key_id}")
    print(f"revoked {out['id']} (team '{out['team']}'); every ingress replica refuses it within auth.key_cache_s")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    params = {k: v for k, v in (("team", args.team), ("month", args.month)) if v}
    out = _call("GET", args.url, "/v1/coe/usage", params=params)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"usage in {out['month']} (UTC)")
    print(f"{'team':<18}{'expert':<16}{'requests':>10}{'tokens':>12}{'cost USD':>12}  budget")
    for team, row in out["teams"].items():
        b = row.get("budget")
        budget = f"${b['spent_usd']:.4f} of ${b['budget_usd']:g} this {b['period']}" if b else "-"
        print(f"{team:<18}{'(all)':<16}{row['requests']:>10}{row['tokens']:>12}{row['cost_usd']:>12.4f}  {budget}")
        for expert, e in sorted(row["experts"].items()):
            print(f"{'':<18}{expert:<16}{e['requests']:>10}{e['tokens']:>12}{e['cost_usd']:>12.4f}")
    return 0


def _guard(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args))
        except CliError as err:
            print(f"coe: {err}", file=sys.stderr)
            return 1
    return run


def add_admin_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`coe keys create|list|revoke` and `coe usage`."""
    keys = sub.add_parser("keys", help="manage API keys of a running coe (needs the admin key in COE_ADMIN_KEY)")
    ks = keys.add_subparsers(dest="keys_command", required=True)

    c = ks.add_parser("create", help="create a key for a team; prints the key alone on stdout (shown once)")
    c.add_argument("--team", required=True)
    c.add_argument("--rpm", type=int, default=None, help="requests per minute (default: unlimited)")
    c.add_argument("--tpm", type=int, default=None, help="tokens per minute, prompt + completion")
    c.add_argument("--budget-usd", type=float, default=None, help="the team's spend budget per --period")
    c.add_argument("--period", choices=["day", "week", "month"], default=None, help="budget period (UTC; month)")
    c.add_argument("--experts", default=None, help="comma-separated experts the key may use (default: all)")
    c.add_argument("--expires", type=_date, default=None, help="expiry, ISO date or datetime (UTC)")
    c.add_argument("--json", action="store_true", help="print {id, key, team} as JSON")
    c.add_argument("--url", default=DEFAULT_URL)
    c.set_defaults(func=_guard(cmd_keys_create))

    ls = ks.add_parser("list", help="list keys (never the key or its full hash)")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--url", default=DEFAULT_URL)
    ls.set_defaults(func=_guard(cmd_keys_list))

    rv = ks.add_parser("revoke", help="revoke a key by its id")
    rv.add_argument("key_id")
    rv.add_argument("--url", default=DEFAULT_URL)
    rv.set_defaults(func=_guard(cmd_keys_revoke))

    u = sub.add_parser("usage", help="requests, tokens and spend per team and expert (admin key)")
    u.add_argument("--team", default=None)
    u.add_argument("--month", default=None, help="YYYY-MM (default: this month, UTC)")
    u.add_argument("--json", action="store_true")
    u.add_argument("--url", default=DEFAULT_URL)
    u.set_defaults(func=_guard(cmd_usage))
