# hello64 (long mode): print a greeting on COM1 and exit with 0.
.intel_syntax noprefix
.code64
.text
.include "abi.inc"
.globl _start
_start:
    test edi, edi                 # only vCPU 0 talks; the others park
    jnz park
    cld
    lea rsi, [rip + msg]
    call puts
    xor eax, eax
    jmp exit

msg: .asciz "Hello from a kvmkit long-mode guest!\r\n"

.include "lib64.inc"
