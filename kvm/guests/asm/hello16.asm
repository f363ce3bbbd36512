# hello16 (real mode): print a greeting on COM1 and exit with 0.
.intel_syntax noprefix
.code16
.text
.include "abi.inc"
.globl _start
_start:
    cli
    cld
    xor ax, ax
    mov ds, ax
    mov si, offset msg
    call puts16
    xor al, al
    jmp exit16

msg: .asciz "Hello from a kvmkit real-mode guest!\r\n"

.include "lib16.inc"
