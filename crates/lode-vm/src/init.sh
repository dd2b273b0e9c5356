#!/bin/busybox sh
# lode's guest init. The image's ext4 is /dev/vda. /lode/base.sh sets LODE_MODULES, the
# modules to load in order; /lode/run.sh (appended for each run)
# sets LODE_TOKEN, LODE_MOUNT, LODE_PATH, LODE_CWD, LODE_USER, the command as "$@" and
# lode_env, which runs its arguments with the command's environment only.
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
. /lode/base.sh
. /lode/run.sh
# The console carries the command's output byte for byte: no \n -> \r\n, no echo.
$B stty -opost -echo </dev/console 2>/dev/null

fail() {
	printf '@lode:%s:error:%s\n' "$LODE_TOKEN" "$*"
	$B sync
	$B poweroff -f
	exit 1
}

for m in $LODE_MODULES; do
	err=$($B insmod "/lib/modules/$m.ko" 2>&1) || fail "loading module $m: $err"
done
i=0
while [ ! -b /dev/vda ]; do
	i=$((i + 1))
	[ $i -gt 1000 ] && fail "no disk appeared as /dev/vda within 10 s"
	$B usleep 10000
done
$B mkdir -p /newroot
err=$($B mount -t ext4 -o "$LODE_MOUNT" /dev/vda /newroot 2>&1) ||
	fail "mounting the image (/dev/vda) as ext4: $err"
[ -d /newroot/proc ] && $B mount -t proc proc /newroot/proc
[ -d /newroot/sys ] && $B mount -t sysfs sys /newroot/sys
[ -d /newroot/dev ] && $B mount -t devtmpfs dev /newroot/dev

# The user: numbers as they are, names from the image's own /etc/passwd and /etc/group.
field() { # FILE NAME COLUMN: COLUMN of the first line of FILE whose name is NAME
	[ -f "/newroot$1" ] && $B awk -F: -v n="$2" -v c="$3" \
		'$1 == n && $3 ~ /^[0-9]+$/ { print $c; exit }' "/newroot$1"
}
user=${LODE_USER%%:*}
group=
case $LODE_USER in *:*) group=${LODE_USER#*:} ;; esac
uid=0 gid=0
if [ -n "$user" ]; then
	case $user in
	*[!0-9]*)
		uid=$(field /etc/passwd "$user" 3)
		[ -n "$uid" ] || fail "user \"$user\" is not in the image's /etc/passwd"
		gid=$(field /etc/passwd "$user" 4)
		;;
	*)
		uid=$user
		[ -z "$group" ] && gid=$([ -f /newroot/etc/passwd ] && $B awk -F: -v u="$uid" \
			'$3 == u && $4 ~ /^[0-9]+$/ { print $4; exit }' /newroot/etc/passwd)
		;;
	esac
fi
case $gid in '' | *[!0-9]*) gid=0 ;; esac
if [ -n "$group" ]; then
	case $group in
	*[!0-9]*)
		gid=$(field /etc/group "$group" 3)
		[ -n "$gid" ] || fail "group \"$group\" is not in the image's /etc/group"
		;;
	*) gid=$group ;;
	esac
fi

# The program, looked up in the image's PATH here: busybox would run its own applet of
# the same name instead of the image's program.
prog=$1
shift
case $prog in
*/*) ;;
*)
	found=
	IFS=:
	for d in $LODE_PATH; do
		if [ -n "$d" ] && { [ -L "/newroot$d/$prog" ] || [ -f "/newroot$d/$prog" ]; }; then
			found=$d/$prog
			break
		fi
	done
	unset IFS
	[ -n "$found" ] || fail "$prog is not in the image's PATH ($LODE_PATH)"
	prog=$found
	;;
esac
[ -d "/newroot$LODE_CWD" ] || fail "the working directory $LODE_CWD is not a directory of the image"

printf '@lode:%s:start\n' "$LODE_TOKEN"
lode_env $B nsenter -r/newroot "-w/newroot$LODE_CWD" -S "$uid" -G "$gid" -F -- "$prog" "$@" </dev/null
status=$?
printf '@lode:%s:exit:%d\n' "$LODE_TOKEN" "$status"
for d in dev sys proc; do $B umount "/newroot/$d" 2>/dev/null; done
$B mount -o remount,ro /newroot 2>/dev/null
$B sync
$B poweroff -f
