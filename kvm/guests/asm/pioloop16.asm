# pioloop16 (real mode): N times outb to port 0xE0 (N = qword at 0x6000,
# 0 = forever), then exit with 0.
.intel_syntax noprefix
.code16
.text
.include "abi.inc"
.globl _start
_start:
    cli
    xor ax, ax
    mov ds, ax
    mov ecx, dword ptr [PARAM_ITERS]      # N, low dword
    mov edx, dword ptr [PARAM_ITERS + 4]  # N, high dword
1:  out PIO_PORT, al
    sub ecx, 1                    # 64-bit decrement of edx:ecx; N = 0
    sbb edx, 0                    # wraps: effectively forever
    mov ebx, ecx
    or ebx, edx
    jnz 1b
    xor al, al
    jmp exit16

.include "lib16.inc"
