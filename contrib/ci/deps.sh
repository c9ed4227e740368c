# shellcheck shell=sh
# contrib/ci/deps.sh - sourced by the CI scripts (build.sh, test.sh, aarch64.sh), from the top
# of the tree. ci_install PKG...: installs with apt-get those Debian packages of the list that
# are not installed yet, through sudo when not root; nothing when all are there.
ci_install() {
    missing=""
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" ||
            missing="$missing $p"
    done
    [ -n "$missing" ] || return 0
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends $missing
}

# ci_install_tool CMD:PKG...: installs PKG where the command CMD is missing. For tools a test
# can live without (the openai client test skips without node and npm), and which a host may
# already have from elsewhere (a nodejs with its own npm, which Debian's npm conflicts with):
# a failure here is a warning, not the end of the run.
ci_install_tool() {
    want=""
    for cp in "$@"; do
        command -v "${cp%%:*}" >/dev/null 2>&1 || want="$want ${cp#*:}"
    done
    [ -n "$want" ] || return 0
    # shellcheck disable=SC2086
    ci_install $want || echo "warning: could not install$want; the tests that need them skip"
}
