#!/bin/sh
# /init of the kvmkit test kernel's initramfs (busybox sh).
#
# Prints KVMKIT-INIT-OK (first user-space line) and cpus=N, then runs the
# test named by the kernel parameter kvmkit.test=NAME and prints
#   KVMKIT-TEST name=NAME result=PASS|FAIL [details]
# For tests whose success ends the VM (panic, exitport, reboot) a PASS line
# is printed before the action and a FAIL line after it if the VM survived:
# the last KVMKIT-TEST line wins.
#
# Parameters (all optional except where a test needs them):
#   kvmkit.test=boot|panic|exitport|reboot|disk|net|rng|shell  (default boot)
#   kvmkit.code=N          exitport: byte written to port 0xf4 (default 7)
#   kvmkit.sum=HEX         disk: expected sha256 of all of /dev/vda
#   kvmkit.ip=A.B.C.D/NN   net: static address (default: DHCP via udhcpc)
#   kvmkit.gw=A.B.C.D      net: gateway/host to contact (default: DHCP router)
#   kvmkit.port=N          net: TCP port on the gateway (default 80); an HTTP
#                          GET is sent and PASS means any reply (first= shows
#                          its first line, spaces as _)
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp

echo KVMKIT-INIT-OK
echo "cpus=$(grep -c ^processor /proc/cpuinfo)"

test=boot code=7 sum= ip= gw= port=80
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	kvmkit.test=*) test=${arg#*=} ;;
	kvmkit.code=*) code=${arg#*=} ;;
	kvmkit.sum=*) sum=${arg#*=} ;;
	kvmkit.ip=*) ip=${arg#*=} ;;
	kvmkit.gw=*) gw=${arg#*=} ;;
	kvmkit.port=*) port=${arg#*=} ;;
	esac
done

result() { echo "KVMKIT-TEST name=$test result=$*"; }

case "$test" in
boot)
	result PASS
	;;
panic)
	result PASS action=sysrq-crash
	echo 1 >/proc/sys/kernel/sysrq
	echo c >/proc/sysrq-trigger
	sleep 2
	result FAIL reason=survived-panic
	;;
exitport)
	result PASS action=outb port=0xf4 code=$code
	printf "\\$(printf %03o "$code")" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
	sleep 2
	result FAIL reason=survived-exit-port
	;;
reboot)
	result PASS action=reboot
	reboot -f
	sleep 5
	result FAIL reason=survived-reboot
	;;
disk)
	if [ ! -b /dev/vda ]; then
		result FAIL reason=no-/dev/vda
	else
		got=$(sha256sum /dev/vda | cut -d' ' -f1)
		if [ -n "$sum" ] && [ "$got" != "$sum" ]; then
			result FAIL reason=sum-mismatch sum=$got want=$sum
		else
			# Write a recognizable 4 KiB block at offset 4096, sync, drop
			# caches and read it back.
			printf 'KVMKIT-DISK-BLOCK' >/tmp/pat
			dd if=/dev/zero bs=1 count=$((4096 - 17)) 2>/dev/null >>/tmp/pat
			want=$(sha256sum /tmp/pat | cut -d' ' -f1)
			dd if=/tmp/pat of=/dev/vda bs=4096 seek=1 count=1 conv=fsync 2>/dev/null
			sync
			echo 3 >/proc/sys/vm/drop_caches 2>/dev/null
			back=$(dd if=/dev/vda bs=4096 skip=1 count=1 2>/dev/null | sha256sum | cut -d' ' -f1)
			if [ "$back" = "$want" ]; then
				result PASS sum=$got written=4096@4096
			else
				result FAIL reason=readback-mismatch sum=$got
			fi
		fi
	fi
	;;
net)
	ip link set lo up
	ip link set eth0 up 2>/dev/null
	if [ -n "$ip" ]; then
		ip addr add "$ip" dev eth0 && [ -n "$gw" ] && ip route add default via "$gw"
	else
		udhcpc -i eth0 -n -q -t 5 -s /etc/udhcpc.script >/dev/null 2>&1
		[ -n "$gw" ] || gw=$(cat /tmp/gateway 2>/dev/null)
	fi
	addr=$(ip -4 -o addr show dev eth0 2>/dev/null | awk '{print $4}')
	if [ -z "$addr" ] || [ -z "$gw" ]; then
		result FAIL reason=no-address addr=$addr gw=$gw
	else
		# busybox nc, not wget: the static busybox's wget crashes in this
		# kernel's user space (resolver); nc with a numeric address is fine.
		resp=$(printf 'GET / HTTP/1.0\r\nHost: %s\r\n\r\n' "$gw" | nc -w 10 "$gw" "$port" 2>/dev/null)
		first=$(printf '%s\n' "$resp" | head -n 1 | tr -d '\r' | tr ' ' '_')
		if [ -n "$resp" ]; then
			result PASS addr=$addr gw=$gw port=$port bytes=$(printf %s "$resp" | wc -c) first=$first
		else
			result FAIL reason=no-response addr=$addr gw=$gw port=$port
		fi
	fi
	;;
rng)
	n=$(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | wc -c)
	if [ "$n" -eq 64 ]; then
		result PASS bytes=64 rng=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)
	else
		result FAIL reason=short-read bytes=$n
	fi
	;;
shell)
	result PASS action=shell
	setsid cttyhack /bin/sh
	;;
*)
	result FAIL reason=unknown-test
	;;
esac
poweroff -f
