#!/bin/sh
# build.sh: assemble the test guests in asm/ into flat binaries.
#
# Usage: sh build.sh [OUTDIR]   (OUTDIR defaults to this directory)
#
# Needs GNU binutils (as, ld, objcopy). A guest whose name ends in "16" is a
# real-mode guest linked at 0x7C00; every other guest is a long-mode guest
# linked at 0x100000. The output is deterministic: rebuilding yields
# byte-identical NAME.bin files.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here}
mkdir -p "$out"
out=$(cd "$out" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM

for src in "$here"/asm/*.asm; do
	name=$(basename "$src" .asm)
	case $name in
	*16) base=0x7C00 ;;
	*) base=0x100000 ;;
	esac
	as --64 -I "$here/asm" -o "$tmp/$name.o" "$src"
	ld -m elf_x86_64 -nostdlib -e _start -Ttext="$base" -o "$tmp/$name.elf" "$tmp/$name.o"
	objcopy -O binary -j .text "$tmp/$name.elf" "$out/$name.bin"
	chmod 644 "$out/$name.bin"
done
