#!/usr/bin/env sh
# Regenerate the example manifests of a three-site mesh (paris, frankfurt, london).
# tests/deploy/test_manifests.py re-runs the command in each file's first line and fails
# when a file drifts from what the generator makes.
set -eu
cd "$(dirname "$0")"
HA=${HARMONY_AGENT:-../../.venv/bin/harmony-agent}
gen() {
  site=$1; shift
  out=example-$site.yaml
  printf '# harmony-agent manifests %s\n' "$*" > "$out"
  printf '# Generated example (site %s of a three-site mesh); do not edit: regenerate.\n' "$site" >> "$out"
  "$HA" manifests "$@" >> "$out"
}
# An example trust-admin public key (`harmony-agent ca trust-admin-init` prints yours).
TRUST_ADMIN=ed25519:0ZwlHMO0abKYrnv6PX8Ikt2VwxXHU+NuUCbsxO3azWc=
peers() {
  for s in "$@"; do for i in 0 1 2; do printf '%s=nats-%s.%s.harmony.example:6222,' "$s" "$i" "$s"; done; done | sed 's/,$//'
}
gen paris --site paris \
  --nodes ip-10-1-1-10.eu-west-3.compute.internal,ip-10-1-2-11.eu-west-3.compute.internal,ip-10-1-3-12.eu-west-3.compute.internal \
  --peers "$(peers frankfurt london)" --peer-cidrs 10.2.0.0/16,10.3.0.0/16 \
  --external-domain paris.harmony.example --operators alice --trust-admin-public-key "$TRUST_ADMIN"
gen frankfurt --site frankfurt \
  --nodes fra-node-1,fra-node-2,fra-node-3 \
  --peers "$(peers paris london)" --peer-cidrs 10.1.0.0/16,10.3.0.0/16 \
  --external-domain frankfurt.harmony.example --operators alice --trust-admin-public-key "$TRUST_ADMIN"
gen london --site london \
  --nodes gke-lon-pool-1a2b3c4d-x1,gke-lon-pool-1a2b3c4d-x2,gke-lon-pool-1a2b3c4d-x3 \
  --peers "$(peers paris frankfurt)" --peer-cidrs 10.1.0.0/16,10.2.0.0/16 \
  --external-domain london.harmony.example --operators alice --trust-admin-public-key "$TRUST_ADMIN"
