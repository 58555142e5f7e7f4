#!/usr/bin/env bash
# Make a local TEST certificate authority, a broker certificate and optional client certificates.
#
#   systemd/make-test-ca.sh [-d DIR] [-n NAME]... [CLIENT]...
#
#   -d DIR    where to write (default: var/tls under the repository, which .gitignore's /var/
#             already covers); the directory gets its own ".gitignore" ("*") as well, so its keys
#             are never committed wherever it is.
#   -n NAME   a DNS name or IP address the broker certificate must carry (repeatable; default
#             localhost and 127.0.0.1). Changing the list re-issues the broker certificate.
#   CLIENT    names of client certificates to make (CN = the name, e.g. a site id: home-1).
#
# Writes: ca.crt, ca.key, server.crt, server.key, <client>.crt, <client>.key (keys 0600).
# Idempotent: an existing CA is reused; a certificate that still verifies against the CA, has
# the requested names and is valid for another 30 days is kept. Keys are EC P-256 (fast on a Pi).
# For a TEST or a lab only: a production broker uses a certificate from the operator's CA (or an
# ACME/Let's Encrypt certificate for a public name); see systemd/mosquitto/README.md.
set -euo pipefail
umask 077

repo="$(cd "$(dirname "$0")/.." && pwd)"
dir="$repo/var/tls"
names=()
while getopts "d:n:h" opt; do
    case "$opt" in
        d) dir="$OPTARG" ;;
        n) names+=("$OPTARG") ;;
        h) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "usage: $0 [-d DIR] [-n NAME]... [CLIENT]..." >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ ${#names[@]} -gt 0 ] || names=(localhost 127.0.0.1)
command -v openssl >/dev/null || { echo "make-test-ca: openssl is not installed" >&2; exit 1; }

mkdir -p "$dir"
chmod 0700 "$dir"
[ -f "$dir/.gitignore" ] || printf '# made by systemd/make-test-ca.sh: keys, never commit\n*\n' > "$dir/.gitignore"
cd "$dir"

san=""
for n in "${names[@]}"; do
    if [[ "$n" =~ ^[0-9.]+$ || "$n" == *:* ]]; then san+="IP:$n,"; else san+="DNS:$n,"; fi
done
san="${san%,}"

newkey() {  # newkey FILE: an EC P-256 private key, 0600
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
    chmod 0600 "$1"
}

still_good() {  # still_good CERT [SAN]: verifies against ca.crt, >= 30 days left, same SAN
    [ -f "$1" ] && [ -f "${1%.crt}.key" ] || return 1
    openssl verify -CAfile ca.crt "$1" >/dev/null 2>&1 || return 1
    openssl x509 -in "$1" -noout -checkend $((30 * 86400)) >/dev/null 2>&1 || return 1
    if [ -n "${2:-}" ]; then
        local have
        have="$(openssl x509 -in "$1" -noout -ext subjectAltName 2>/dev/null | tail -n +2 \
                | tr -d ' ' | sed 's/IPAddress:/IP:/g')"
        [ "$have" = "$2" ] || return 1
    fi
}

# --- the CA ---------------------------------------------------------------------------------
if [ ! -f ca.key ] || [ ! -f ca.crt ] \
        || ! openssl x509 -in ca.crt -noout -checkend $((30 * 86400)) >/dev/null 2>&1; then
    newkey ca.key
    openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/O=hems test/CN=hems test CA" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" -out ca.crt
    chmod 0644 ca.crt
    rm -f server.crt ./*.srl  # anything issued by an older CA is re-issued below
    echo "make-test-ca: new CA $dir/ca.crt"
fi

issue() {  # issue NAME CN EXTENSIONS
    local ext
    ext="$(mktemp)"
    printf '%s\n' "$3" > "$ext"
    newkey "$1.key"
    openssl req -new -key "$1.key" -subj "/O=hems test/CN=$2" -out "$1.csr"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days 825 \
        -extfile "$ext" -out "$1.crt" 2>/dev/null
    chmod 0644 "$1.crt"
    rm -f "$1.csr" "$ext"
}

# --- the broker -----------------------------------------------------------------------------
if ! still_good server.crt "$san"; then
    issue server "${names[0]}" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san"
    echo "make-test-ca: broker certificate $dir/server.crt for $san"
fi

# --- clients --------------------------------------------------------------------------------
for c in "$@"; do
    if [[ ! "$c" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]] || [ "$c" = ca ] || [ "$c" = server ]; then
        echo "make-test-ca: client name '$c' must be 1-64 of A-Z a-z 0-9 _ . - (not ca/server)" >&2
        exit 2
    fi
    if ! still_good "$c.crt"; then
        issue "$c" "$c" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
        echo "make-test-ca: client certificate $dir/$c.crt (CN=$c)"
    fi
done
