#!/usr/bin/env bash
# codex_auth_sync.sh — reference workspace client of codex-auth-broker.
#
# Fetches the shared codex login (the auth.json document) from the broker and
# writes it, byte for byte, to ${CODEX_HOME}/auth.json. Needs only bash and curl
# (plus coreutils: mktemp, mv, cmp, cksum, sync).
#
# Usage:
#   codex_auth_sync.sh            sync once (run it before codex starts)
#   codex_auth_sync.sh --loop     sync now, then every CODEX_AUTH_SYNC_INTERVAL_SECONDS
#   codex_auth_sync.sh --help     print this header
#
# Environment:
#   CODEX_AUTH_BROKER_URL             broker base URL, e.g. http://broker:8080 (required)
#   CODEX_AUTH_BROKER_TOKEN           this workspace's client bearer token, or
#   CODEX_AUTH_BROKER_TOKEN_FILE      a file whose first line is that token
#                                     (used only when CODEX_AUTH_BROKER_TOKEN is unset/empty)
#   CODEX_HOME                        codex's home, default $HOME/.codex (created 0700)
#   CODEX_AUTH_SYNC_INTERVAL_SECONDS  --loop period, default 300
#
# What it does: GET ${CODEX_AUTH_BROKER_URL}/codex-auth with
# "Authorization: Bearer <token>", "Accept: application/json", curl --max-time 30,
# and "If-None-Match: <etag>" when auth.json exists and is still what this script
# last wrote (the ETag is kept in ${CODEX_HOME}/.auth.json.etag, mode 0600).
#   200  body must be a JSON object; written atomically (temp file in CODEX_HOME,
#        mode 0600, fsync, rename over auth.json); nothing is rewritten when the
#        content is identical.
#   304  unchanged.
#   401, 503 (+ Retry-After), anything else, network errors, an empty body or a
#        body that is not a JSON object: auth.json is left untouched.
# The token is never put on curl's command line (it is passed via stdin) and
# neither the token nor the document is ever printed. One line per run on stderr.
#
# Exit codes:
#   0  auth.json written, or unchanged (including 304)
#   1  not configured (no URL, no token, bad interval)
#   2  broker error: any status other than 2xx/304, network error or timeout,
#      empty body, or a body that is not a JSON object (auth.json untouched)
#
# Point stock codex at the broker's refresh shim, so that a refresh by codex
# (e.g. after a 401, "unauthorized_recovery") reaches the broker instead of
# burning the shared single-use refresh token upstream:
#   export CODEX_REFRESH_TOKEN_URL_OVERRIDE="${CODEX_AUTH_BROKER_URL}/oauth/token"
#
# Example:
#   CODEX_AUTH_BROKER_URL=http://broker:8080 \
#   CODEX_AUTH_BROKER_TOKEN_FILE=/run/secrets/codex-broker-token \
#   codex_auth_sync.sh && \
#   CODEX_REFRESH_TOKEN_URL_OVERRIDE=http://broker:8080/oauth/token codex exec "..."

set -u
umask 077

PROG=codex_auth_sync

log() {
  printf '%s: %s\n' "$PROG" "$*" >&2
}

usage() {
  local line
  while IFS= read -r line; do
    case "$line" in
      '#!'*) continue ;;
      '#'*) printf '%s\n' "${line#\#}" | sed 's/^ //' ;;
      *) break ;;
    esac
  done < "$0"
}

# Escape a value for a double-quoted string in a curl config file.
curl_quote() {
  local v=$1
  v=${v//\\/\\\\}
  v=${v//\"/\\\"}
  printf '"%s"' "$v"
}

# Fingerprint of a file's content (change detection only, not security).
fingerprint() {
  cksum < "$1" 2>/dev/null
}

# One sync. Runs in a subshell (see main), so `exit` ends this run only and the
# EXIT trap removes this run's temp files.
sync_once() {
  local url=${CODEX_AUTH_BROKER_URL:-}
  local token=${CODEX_AUTH_BROKER_TOKEN:-}
  local token_file=${CODEX_AUTH_BROKER_TOKEN_FILE:-}

  url=${url%/}
  if [ -z "$url" ]; then
    log "not configured: CODEX_AUTH_BROKER_URL is not set"
    exit 1
  fi
  if [ -z "$token" ] && [ -n "$token_file" ]; then
    if [ ! -r "$token_file" ]; then
      log "not configured: CODEX_AUTH_BROKER_TOKEN_FILE is not readable"
      exit 1
    fi
    IFS= read -r token < "$token_file" || true
    token=${token%$'\r'}
    token=${token#"${token%%[![:space:]]*}"}
    token=${token%"${token##*[![:space:]]}"}
  fi
  if [ -z "$token" ]; then
    log "not configured: no token (CODEX_AUTH_BROKER_TOKEN or CODEX_AUTH_BROKER_TOKEN_FILE)"
    exit 1
  fi
  case "$token" in
    *[[:cntrl:]]*)
      log "not configured: the token contains control characters"
      exit 1
      ;;
  esac

  local home=${CODEX_HOME:-${HOME:-}/.codex}
  if [ ! -d "$home" ]; then
    # umask 077: every directory created here is 0700.
    if ! mkdir -p -- "$home" 2>/dev/null || ! chmod 700 -- "$home"; then
      log "error: cannot create CODEX_HOME"
      exit 2
    fi
  fi
  local auth="$home/auth.json"
  local etag_file="$home/.auth.json.etag"

  local tmp="" hdr="" etag_tmp=""
  # shellcheck disable=SC2317  # invoked by the trap
  cleanup() {
    [ -n "$tmp" ] && rm -f -- "$tmp"
    [ -n "$hdr" ] && rm -f -- "$hdr"
    [ -n "$etag_tmp" ] && rm -f -- "$etag_tmp"
    return 0
  }
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM HUP

  tmp=$(mktemp "$home/.auth.json.XXXXXXXX" 2>/dev/null) || { log "error: cannot create a temp file in CODEX_HOME"; exit 2; }
  hdr=$(mktemp "$home/.auth.json.hdr.XXXXXXXX" 2>/dev/null) || { log "error: cannot create a temp file in CODEX_HOME"; exit 2; }

  # Send If-None-Match only when auth.json is still exactly what we wrote with that ETag.
  local sent_etag="" saved_etag="" saved_fp=""
  if [ -f "$auth" ] && [ -r "$etag_file" ]; then
    { IFS= read -r saved_etag; IFS= read -r saved_fp; } < "$etag_file" || true
    if [ -n "$saved_etag" ] && [ -n "$saved_fp" ] && [ "$saved_fp" = "$(fingerprint "$auth")" ]; then
      sent_etag=$saved_etag
    fi
  fi

  local -a args=(
    --silent --max-time 30 --proto '=http,https'
    --config -
    --header 'Accept: application/json'
    --dump-header "$hdr"
    --output "$tmp"
    --write-out '%{http_code}'
  )
  if [ -n "$sent_etag" ]; then
    args+=(--header "If-None-Match: $sent_etag")
  fi

  local status rc=0
  # The token travels on curl's stdin (a curl config line), never on its argv.
  status=$(printf 'header = %s\n' "$(curl_quote "Authorization: Bearer $token")" \
    | curl "${args[@]}" "$url/codex-auth") || rc=$?
  token=""
  if [ "$rc" -ne 0 ]; then
    log "error: broker unreachable or timed out (curl exit $rc); auth.json untouched"
    exit 2
  fi

  # Response headers we care about (the last header block, in case of 1xx).
  local line name value etag="" retry_after="" ctype=""
  while IFS= read -r line || [ -n "$line" ]; do
    line=${line%$'\r'}
    case "$line" in
      HTTP/*) etag="" retry_after="" ctype="" ; continue ;;
      *:*) ;;
      *) continue ;;
    esac
    name=${line%%:*}
    value=${line#*:}
    value=${value#"${value%%[![:space:]]*}"}
    value=${value%"${value##*[![:space:]]}"}
    case "${name,,}" in
      etag) etag=$value ;;
      retry-after) retry_after=$value ;;
      content-type) ctype=$value ;;
    esac
  done < "$hdr"

  case "$status" in
    304)
      if [ -n "$sent_etag" ]; then
        log "unchanged (304)"
        exit 0
      fi
      log "error: HTTP 304 without a conditional request; auth.json untouched"
      exit 2
      ;;
    2??) ;;
    *)
      local detail="" code=""
      case "$ctype" in
        *json*)
          local head_body=""
          IFS= read -r -d '' -n 4096 head_body < "$tmp" || true
          if [[ $head_body =~ \"code\"[[:space:]]*:[[:space:]]*\"([A-Za-z0-9_.-]{1,64})\" ]]; then
            code=${BASH_REMATCH[1]}
          fi
          ;;
      esac
      [ -n "$code" ] && detail=" code=$code"
      if [ -n "$retry_after" ] && [[ $retry_after =~ ^[A-Za-z0-9\ ,:-]{1,40}$ ]]; then
        detail="$detail retry-after=$retry_after"
      fi
      case "$status" in
        401) log "error: HTTP 401 (client token rejected)$detail; auth.json untouched" ;;
        503) log "error: HTTP 503 (broker has no usable token)$detail; auth.json untouched" ;;
        *) log "error: HTTP $status$detail; auth.json untouched" ;;
      esac
      exit 2
      ;;
  esac

  if [ ! -s "$tmp" ]; then
    log "error: HTTP $status with an empty body; auth.json untouched"
    exit 2
  fi
  # Cheap shape check: first and last non-space characters are { and }.
  local first last
  first=$(LC_ALL=C tr -d ' \t\r\n' < "$tmp" | head -c 1)
  last=$(tail -c 256 "$tmp" | LC_ALL=C tr -d ' \t\r\n' | tail -c 1)
  if [ "$first" != "{" ] || [ "$last" != "}" ]; then
    log "error: HTTP $status body is not a JSON object; auth.json untouched"
    exit 2
  fi

  local outcome
  if [ -f "$auth" ] && cmp -s "$tmp" "$auth"; then
    outcome="unchanged ($status, identical content)"
  else
    chmod 600 "$tmp" || { log "error: chmod failed; auth.json untouched"; exit 2; }
    sync "$tmp" 2>/dev/null || sync
    if ! mv -f -- "$tmp" "$auth"; then
      log "error: cannot rename into auth.json; auth.json untouched"
      exit 2
    fi
    tmp=""
    sync "$home" 2>/dev/null || true
    outcome="wrote auth.json ($status)"
  fi

  # Remember the ETag with a fingerprint of the file it belongs to.
  if [ -n "$etag" ] && [[ $etag =~ ^(W/)?\"[^\"]*\"$ ]]; then
    etag_tmp=$(mktemp "$home/.auth.json.etag.XXXXXXXX" 2>/dev/null) \
      && printf '%s\n%s\n' "$etag" "$(fingerprint "$auth")" > "$etag_tmp" \
      && mv -f -- "$etag_tmp" "$etag_file" \
      && etag_tmp=""
  else
    rm -f -- "$etag_file"
  fi

  log "$outcome"
  exit 0
}

main() {
  case "${1:-}" in
    -h|--help)
      usage
      exit 0
      ;;
    --loop)
      local interval=${CODEX_AUTH_SYNC_INTERVAL_SECONDS:-300}
      if ! [[ $interval =~ ^[0-9]+$ ]] || [ "$interval" -lt 1 ]; then
        log "not configured: CODEX_AUTH_SYNC_INTERVAL_SECONDS must be a positive integer"
        exit 1
      fi
      local sleeper=""
      trap '[ -n "$sleeper" ] && kill "$sleeper" 2>/dev/null; exit 143' TERM HUP
      trap '[ -n "$sleeper" ] && kill "$sleeper" 2>/dev/null; exit 130' INT
      while :; do
        ( sync_once ) || true
        sleep "$interval" &
        sleeper=$!
        wait "$sleeper" || true
        sleeper=""
      done
      ;;
    '')
      ( sync_once )
      exit $?
      ;;
    *)
      log "unknown argument: $1 (use --loop or --help)"
      exit 1
      ;;
  esac
}

main "$@"
