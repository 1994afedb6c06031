#!/usr/bin/env bash
# A local Label Studio server for review and for the integration test, kept in its own virtual
# environment (.venv-labelstudio): its dependencies (Django and friends) stay out of .venv.
#
# Usage:
#   bash scripts/labelstudio_server.sh install
#       create .venv-labelstudio and install label-studio (idempotent; a few minutes the first time)
#   LABEL_STUDIO_USERNAME=U LABEL_STUDIO_PASSWORD=P LABEL_STUDIO_USER_TOKEN=T \
#     bash scripts/labelstudio_server.sh start PORT DATA_DIR DOCUMENT_ROOT
#       run the server in the foreground on 127.0.0.1:PORT with its database in DATA_DIR, serving
#       local files under DOCUMENT_ROOT; the user and API token are created at start-up. The token is
#       read from the environment, so it does not appear in the process list of this script.
# Environment: LABEL_STUDIO_VERSION (default 1.23.2), PYTHON (default python3), LS_VENV (default
# .venv-labelstudio).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LS_VERSION="${LABEL_STUDIO_VERSION:-1.23.2}"
LS_VENV="${LS_VENV:-.venv-labelstudio}"
PYTHON="${PYTHON:-python3}"

install() {
  local stamp="$LS_VENV/.installed-label-studio-$LS_VERSION"
  if [ -f "$stamp" ]; then
    return 0
  fi
  if [ ! -x "$LS_VENV/bin/python" ]; then
    echo "[labelstudio] creating $LS_VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$LS_VENV"
  fi
  echo "[labelstudio] installing label-studio==$LS_VERSION into $LS_VENV (first time: several minutes)"
  "$LS_VENV/bin/python" -m pip install --quiet --upgrade pip
  "$LS_VENV/bin/python" -m pip install --quiet "label-studio==$LS_VERSION"
  rm -f "$LS_VENV"/.installed-label-studio-*
  touch "$stamp"
}

start() {
  if [ $# -ne 3 ]; then
    echo "usage: $0 start PORT DATA_DIR DOCUMENT_ROOT" >&2
    exit 2
  fi
  local port="$1" data_dir="$2" doc_root="$3"
  : "${LABEL_STUDIO_USERNAME:?set LABEL_STUDIO_USERNAME (an e-mail address)}"
  : "${LABEL_STUDIO_PASSWORD:?set LABEL_STUDIO_PASSWORD}"
  : "${LABEL_STUDIO_USER_TOKEN:?set LABEL_STUDIO_USER_TOKEN}"
  if [ ! -x "$LS_VENV/bin/label-studio" ]; then
    echo "[labelstudio] $LS_VENV/bin/label-studio not found: run '$0 install' first" >&2
    exit 1
  fi
  mkdir -p "$data_dir"
  # Physical path: pipeline resolves symlinks in the storage path it registers, and Label Studio
  # rejects a storage whose path is not under the document root as written.
  doc_root="$(cd "$doc_root" && pwd -P)"
  export LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true
  export LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT="$doc_root"
  export LABEL_STUDIO_BASE_DATA_DIR="$data_dir"
  export LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true
  export LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK=true
  export SENTRY_DSN="" FRONTEND_SENTRY_DSN="" COLLECT_ANALYTICS=false LATEST_VERSION_CHECK=false  # offline-safe
  exec "$LS_VENV/bin/label-studio" start --no-browser --internal-host 127.0.0.1 -p "$port" \
    --data-dir "$data_dir" --enable-legacy-api-token
}

case "${1:-}" in
  install) install ;;
  start) shift; start "$@" ;;
  *) echo "usage: $0 install | start PORT DATA_DIR DOCUMENT_ROOT" >&2; exit 2 ;;
esac
