# pioloop (long mode): N times outb to port 0xE0 (N = qword at 0x6000,
# 0 = forever), then exit with 0. Measures the cost of one PIO exit.
.intel_syntax noprefix
.code64
.text
.include "abi.inc"
.globl _start
_start:
    test edi, edi                 # only vCPU 0 loops; the others park
    jnz park
    mov rcx, qword ptr [PARAM_ITERS]
    # With N = 0 the first dec wraps to 2^64-1: effectively forever.
1:  out PIO_PORT, al
    dec rcx
    jnz 1b
    xor eax, eax
    jmp exit

.include "lib64.inc"
