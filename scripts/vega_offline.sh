#!/usr/bin/env bash
# Build an offline HTML template for `dvc plots show` / `dvc plots diff`.
#
# DVC's default page loads vega, vega-lite and vega-embed from a CDN, so its
# plots are blank without internet. This script fetches the browser builds
# from the npm registry (`npm pack`), inlines them into an HTML template in the
# format dvc_render expects, writes it to <repo>/.dvc/plots/offline.html (not
# committed to git) and points DVC at it in the repository's *local* config:
#     dvc config --local plots.html_template plots/offline.html
# (DVC resolves a relative plots.html_template against the .dvc/ directory.)
#
# Usage: scripts/vega_offline.sh [REPO_ROOT]
#   REPO_ROOT  DVC repository to set up (default: $VEGA_OFFLINE_REPO, else the
#              repository containing this script).
# Environment:
#   VEGA_OFFLINE_CACHE  where npm tarballs are kept between runs
#                       (default: ${XDG_CACHE_HOME:-$HOME/.cache}/vega-offline)
#   DVC                 dvc command (default: <this repo>/.venv/bin/dvc, else dvc on PATH)
#   NPM                 npm command (default: npm)
#
# Idempotent; a rerun with the template and config in place does nothing.
# It never fails set-up: on any error it prints one line to stderr and exits 0.
set -uo pipefail

# Versions pinned for reproducible HTML; DVC's plot specs are vega-lite v5
# ("$schema": ".../vega-lite/v5.json"), rendered with vega 5 and vega-embed 6.
VEGA_VERSION=5.33.1
VEGA_LITE_VERSION=5.23.0
VEGA_EMBED_VERSION=6.29.0
STAMP="format 1; vega@${VEGA_VERSION} vega-lite@${VEGA_LITE_VERSION} vega-embed@${VEGA_EMBED_VERSION}"

TEMPLATE_REL=plots/offline.html # relative to .dvc/, as DVC resolves it

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
script_repo=$(dirname "$script_dir")
root=${1:-${VEGA_OFFLINE_REPO:-$script_repo}}
cache=${VEGA_OFFLINE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vega-offline}
npm=${NPM:-npm}
if [[ -n ${DVC:-} ]]; then
    dvc=$DVC
elif [[ -x $script_repo/.venv/bin/dvc ]]; then
    dvc=$script_repo/.venv/bin/dvc
else
    dvc=dvc
fi

tmp=
cleanup() { if [[ -n $tmp ]]; then rm -rf -- "$tmp"; fi; }
trap cleanup EXIT

template=
give_up() {
    # A config pointing at a missing file makes `dvc plots show` fail
    # ("HTML template has to contain '{plot_divs}'"), so drop a dangling one.
    if [[ -n $template && ! -f $template ]] && configured; then
        (cd "$root" && "$dvc" config --local --unset plots.html_template) >/dev/null 2>&1
    fi
    echo "vega_offline.sh: offline plot template not built ($1); HTML from 'dvc plots show/diff' loads vega from a CDN, so its data plots need internet" >&2
    exit 0
}

# Is plots.html_template = $TEMPLATE_REL in .dvc/config.local? (no dvc start-up)
configured() {
    local f=$root/.dvc/config.local
    [[ -f $f ]] || return 1
    awk -v want="$TEMPLATE_REL" '
        /^[[:space:]]*\[/ { sec = $0; gsub(/[][[:space:]'\''"]/, "", sec); next }
        sec == "plots" && $0 ~ /^[[:space:]]*html_template[[:space:]]*=/ {
            v = $0; sub(/^[^=]*=[[:space:]]*/, "", v); sub(/[[:space:]]+$/, "", v)
            if (v == want) found = 1
        }
        END { exit !found }' "$f"
}

[[ -d $root/.dvc ]] || give_up "no DVC repository at $root"
root=$(cd "$root" && pwd)
template=$root/.dvc/$TEMPLATE_REL

# Fast path: already done.
if [[ -f $template ]] && head -n 2 "$template" | grep -qF "vega-offline: $STAMP" && configured; then
    exit 0
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/vega-offline.XXXXXX") || give_up "mktemp failed"
mkdir -p "$cache" 2>/dev/null || cache=$tmp/cache

# Fetch one tarball into the cache (npm pack verifies the registry's integrity hash).
fetch() { # name version
    local tgz=$cache/$1-$2.tgz
    if [[ ! -s $tgz ]]; then
        command -v "$npm" >/dev/null 2>&1 || give_up "npm not found"
        (cd "$tmp" && timeout 180 "$npm" pack "$1@$2" --silent --prefer-offline \
            --fetch-retries=0 --fetch-timeout=30000 --no-audit --no-fund) \
            >>"$tmp/npm.log" 2>&1 || give_up "npm pack $1@$2 failed; npm registry unreachable?"
        [[ -s $tmp/$1-$2.tgz ]] || give_up "npm pack $1@$2 produced no tarball"
        mv -f "$tmp/$1-$2.tgz" "$tgz.part.$$" 2>/dev/null && mv -f "$tgz.part.$$" "$tgz" ||
            give_up "cannot write npm tarball cache $cache"
    fi
    mkdir -p "$tmp/$1"
    if ! tar -xzf "$tgz" -C "$tmp/$1" 2>/dev/null; then
        rm -f "$tgz" # corrupt cache entry; it is fetched again next time
        give_up "cannot extract $tgz"
    fi
}
fetch vega "$VEGA_VERSION"
fetch vega-lite "$VEGA_LITE_VERSION"
fetch vega-embed "$VEGA_EMBED_VERSION"

# Append one minified build as an inline <script>. dvc_render fills the
# template with str.replace of {scripts}, {plot_divs} and {refresh_tag} (not
# str.format), so JS braces are harmless; those three tokens must not occur in
# the JS, and "</script" / "<!--" would end or confuse the inline element
# (they can only occur inside JS strings or regexes, where "<\/" and "<\x21"
# mean the same). Source-map comments are dropped (no .map files offline).
inline() { # file
    [[ -s $1 ]] || give_up "missing $(basename "$1") in npm package"
    if grep -qE '\{(scripts|plot_divs|refresh_tag)\}' "$1"; then
        give_up "$(basename "$1") contains a dvc_render placeholder"
    fi
    printf '    <script type="text/javascript">\n'
    sed -e '/^\/\/# sourceMappingURL=/d' \
        -e 's#</\([sS][cC][rR][iI][pP][tT]\)#<\\/\1#g' -e 's#<!--#<\\x21--#g' "$1"
    printf '\n    </script>\n'
}

{
    printf '<!DOCTYPE html>\n<!-- vega-offline: %s; generated by scripts/vega_offline.sh, do not commit -->\n' "$STAMP"
    printf '<html>\n<head>\n    <meta charset="utf-8">\n    {refresh_tag}\n    <title>DVC Plot</title>\n'
    inline "$tmp/vega/package/build/vega.min.js"
    inline "$tmp/vega-lite/package/build/vega-lite.min.js"
    inline "$tmp/vega-embed/package/build/vega-embed.min.js"
    # No {scripts}: dvc_render would put its CDN <script src> tags there.
    cat <<'EOF'
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
EOF
} >"$tmp/offline.html" || give_up "cannot assemble the template"

mkdir -p "$(dirname "$template")" && mv -f "$tmp/offline.html" "$template" ||
    give_up "cannot write $template"

if ! configured; then
    (cd "$root" && "$dvc" config --local plots.html_template "$TEMPLATE_REL") >"$tmp/dvc.log" 2>&1 || {
        rm -f "$template"
        give_up "'dvc config --local plots.html_template' failed: $(tail -n 1 "$tmp/dvc.log")"
    }
fi

if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1 &&
    ! git -C "$root" check-ignore -q "$template"; then
    echo "vega_offline.sh: note: .dvc/$TEMPLATE_REL is not git-ignored; add '/.dvc/$TEMPLATE_REL' to .gitignore" >&2
fi
exit 0
