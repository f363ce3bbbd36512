# exit42 (long mode): exit with code 42 without printing anything.
.intel_syntax noprefix
.code64
.text
.include "abi.inc"
.globl _start
_start:
    test edi, edi                 # only vCPU 0 exits; the others park
    jnz park
    mov al, 42
    jmp exit

.include "lib64.inc"
