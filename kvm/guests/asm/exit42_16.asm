# exit42_16 (real mode): exit with code 42 without printing anything.
.intel_syntax noprefix
.code16
.text
.include "abi.inc"
.globl _start
_start:
    mov al, 42
    jmp exit16

.include "lib16.inc"
