# echo (long mode): read bytes from COM1 (poll LSR bit 0, read RBR) and
# write each one back; after echoing a "q" exit with 0.
.intel_syntax noprefix
.code64
.text
.include "abi.inc"
.globl _start
_start:
    test edi, edi                 # only vCPU 0 reads; the others park
    jnz park
1:  mov dx, COM1_LSR
    in al, dx
    test al, LSR_DR
    jz 1b
    mov dx, COM1_DATA
    in al, dx
    call putc
    cmp al, 'q'
    jne 1b
    xor eax, eax
    jmp exit

.include "lib64.inc"
