#!/usr/bin/env bash
# Builds a RabbitMQ image for the container tests from Debian's packages,
# with no registry: debootstrap a minimal Debian, install rabbitmq-server in
# it, and `docker import` the tree. It is how CI gets an image on a machine
# that reaches only Debian's mirror, and how a user without registry access
# can run the testcontainers path (README, "Testing").
#
#   scripts/rabbitmq-image.sh [IMAGE]     # default wsamqp/rabbitmq:debian
#
# Nothing is done when IMAGE already exists. Needs root, debootstrap and a
# running Docker engine.
set -euo pipefail

image=${1:-wsamqp/rabbitmq:debian}
if docker image inspect "$image" >/dev/null 2>&1; then
	echo "rabbitmq-image: $image exists"
	exit 0
fi

# The suite and mirror this machine's apt already uses.
suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
mirror=$(grep -hoE '^(URIs: |deb )https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null |
	grep -oE 'https?://[^ ]+' | head -n 1 || true)
mirror=${mirror:-http://deb.debian.org/debian}

root=$(mktemp -d /tmp/rabbitmq-rootfs.XXXXXX)
trap 'umount "$root/proc" 2>/dev/null || true; rm -rf "$root"' EXIT

echo "rabbitmq-image: debootstrap $suite from $mirror"
debootstrap --variant=minbase "$suite" "$root" "$mirror" >/dev/null

echo "rabbitmq-image: installing rabbitmq-server"
# No service starts inside the chroot: the package's postinst would try.
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod +x "$root/usr/sbin/policy-rc.d"
mount -t proc proc "$root/proc"
chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null 2>&1
umount "$root/proc"
rm -f "$root/usr/sbin/policy-rc.d"
rm -rf "$root/var/lib/apt/lists/"* "$root/var/cache/apt/"*.bin "$root/var/lib/rabbitmq/mnesia"

# Clients reach a container from the bridge network, never from loopback,
# so guest must be allowed off loopback (RabbitMQ's loopback_users). This
# goes in advanced.config because testcontainers points
# RABBITMQ_CONFIG_FILE at a file of its own.
echo '[{rabbit, [{loopback_users, []}]}].' >"$root/etc/rabbitmq/advanced.config"
: >"$root/etc/rabbitmq/enabled_plugins"
chown -R rabbitmq:rabbitmq "$root/etc/rabbitmq" 2>/dev/null || chroot "$root" chown -R rabbitmq:rabbitmq /etc/rabbitmq

echo "rabbitmq-image: importing $image"
# /usr/lib/rabbitmq/bin/rabbitmq-server logs to stdout, where the wait for
# "Server startup complete" looks; the /usr/sbin wrapper logs to a file.
tar -C "$root" -c . | docker import \
	--change 'CMD ["/usr/lib/rabbitmq/bin/rabbitmq-server"]' \
	--change 'USER rabbitmq' \
	--change 'ENV HOME=/var/lib/rabbitmq' \
	--change 'ENV RABBITMQ_LOGS=-' \
	--change 'EXPOSE 5672 15672' \
	- "$image" >/dev/null
docker image inspect "$image" --format 'rabbitmq-image: {{.RepoTags}} {{.Size}} bytes'
