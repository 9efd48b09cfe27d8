#!/usr/bin/env bash
# Stream answers with curl: /chat as plain text, /chat as SSE, and OpenAI's /v1/chat/completions.
#   SERVICE_URL=http://127.0.0.1:8000 SERVICE_KEY=... bash examples/curl.sh "Why stream answers?"
set -euo pipefail

url=${SERVICE_URL:-http://127.0.0.1:8000}
prompt=${1:-Why do answers stream?}

# -N turns off curl's output buffer, so each piece is printed the moment it arrives.
# The key is read from a file descriptor rather than passed as an argument, where `ps` would show
# it to every user of the machine (printf is a shell builtin, so it never shows up there either).
stream() {
  if [[ -n ${SERVICE_KEY:-} ]]; then
    curl -N -sS --fail-with-body -H @<(printf 'Authorization: Bearer %s\n' "$SERVICE_KEY") "$@"
  else
    curl -N -sS --fail-with-body "$@"
  fi
}
# The prompt as a JSON string: escape backslashes and quotes, fold control characters to spaces.
json_prompt=$(printf '%s' "$prompt" | tr '\000-\037' ' ' | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g')

echo "== POST /chat (plain text)"
# A plain-text answer that fails midway is left unfinished, so curl exits with error 18 instead
# of printing a cut-off answer as if it were whole.
stream -H 'Content-Type: application/json' --data-binary "{\"message\": \"$json_prompt\"}" "$url/chat"
echo

echo "== GET /chat?q=... (server-sent events: delta, then done or error)"
stream -H 'Accept: text/event-stream' -G --data-urlencode "q=$prompt" "$url/chat"

echo "== POST /v1/chat/completions (OpenAI's API; ends with data: [DONE])"
# No "model": the service fills in its configured default (OPENAI_MODEL).
stream -H 'Content-Type: application/json' \
  --data-binary "{\"messages\": [{\"role\": \"user\", \"content\": \"$json_prompt\"}], \"stream\": true}" \
  "$url/v1/chat/completions"
