#!/usr/bin/env bash
# A real systemd (Debian bookworm, systemd 252) in a podman container, reachable over SSH on
# 127.0.0.1:$PORT, for tests/topologies/test_systemd_real.py. Needs root, debootstrap, podman
# and runc; builds the root filesystem from Debian packages once (a few minutes).
#
#   tests/topologies/systemd-container.sh            # build (once) and start
#   export HARMONY_TEST_SYSTEMD_SSH=/var/tmp/harmony-systemd/topology.json
#   .venv/bin/pytest -q tests/topologies/test_systemd_real.py
#   tests/topologies/systemd-container.sh stop
set -euo pipefail
DIR=${HARMONY_SYSTEMD_DIR:-/var/tmp/harmony-systemd}
PORT=${HARMONY_SYSTEMD_PORT:-2299}
NAME=harmony-systemd
if [ "${1:-}" = stop ]; then
  podman rm -f "$NAME" >/dev/null
  exit 0
fi
mkdir -p "$DIR"
ROOT=$DIR/rootfs
if [ ! -x "$ROOT/lib/systemd/systemd" ]; then
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,openssh-server,python3,procps \
    bookworm "$ROOT" http://deb.debian.org/debian
fi
[ -f "$DIR/key" ] || ssh-keygen -q -t ed25519 -N '' -f "$DIR/key"
install -d -m 700 "$ROOT/root/.ssh"
cp "$DIR/key.pub" "$ROOT/root/.ssh/authorized_keys"
cat > "$ROOT/etc/ssh/sshd_config.d/harmony.conf" <<CONF
Port $PORT
ListenAddress 127.0.0.1
PermitRootLogin prohibit-password
PasswordAuthentication no
UsePAM no
CONF
[ -f "$ROOT/etc/ssh/ssh_host_ed25519_key" ] || chroot "$ROOT" ssh-keygen -A
echo "[127.0.0.1]:$PORT $(cut -d' ' -f1,2 "$ROOT/etc/ssh/ssh_host_ed25519_key.pub")" > "$DIR/known_hosts"
cat > "$DIR/topology.json" <<JSON
{"kind": "linux-ssh", "host": "127.0.0.1", "port": $PORT, "user": "root",
 "key_file": "$DIR/key", "known_hosts": "$DIR/known_hosts", "unit_dir": "/etc/systemd/system"}
JSON
podman rm -f "$NAME" >/dev/null 2>&1 || true
podman run -d --name "$NAME" --network=host --systemd=always --runtime runc \
  --cgroup-manager cgroupfs --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
  --rootfs "$ROOT" /lib/systemd/systemd >/dev/null
for _ in $(seq 60); do
  if podman exec "$NAME" systemctl is-system-running 2>/dev/null | grep -qE 'running|degraded'; then
    echo "export HARMONY_TEST_SYSTEMD_SSH=$DIR/topology.json"
    exit 0
  fi
  sleep 0.5
done
echo "systemd did not come up in $NAME" >&2
exit 1
