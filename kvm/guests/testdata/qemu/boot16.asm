# boot16.asm: QEMU-only test harness (never a kvmkit guest). A boot sector
# that moves itself to 0x0600, writes the parameter block at 0x6000, loads
# the real-mode guest from LBA 1 to 0x7C00 and enters it as kvmkit's
# bare-metal ABI says: CS:IP = 0000:7C00, SP = 0x7C00, DS = ES = SS = 0.
# Assemble with --defsym P_ITERS=... (low 32 bits used), GUEST_SECTORS=...
# and link at 0x600.
.intel_syntax noprefix
.code16
.text
.globl _start
_start:
    cli
    cld
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7C00
    mov si, 0x7C00                # move this sector to 0x0600
    mov di, 0x0600
    mov cx, 256
    rep movsw
    ljmp 0, offset moved
moved:
    mov si, offset dap            # DL = boot drive
    mov ah, 0x42
    int 0x13
    jc 1f
    mov dword ptr [0x6000], P_ITERS
    mov dword ptr [0x6004], 0
    xor ax, ax
    xor bx, bx
    xor cx, cx
    xor dx, dx
    xor si, si
    xor di, di
    ljmp 0, 0x7C00
1:  mov al, 0x7E
    out 0xF4, al
    hlt

.align 4
dap: .byte 0x10, 0
     .word GUEST_SECTORS
     .word 0x7C00, 0
     .quad 1

.org 0x1FE
.word 0xAA55
