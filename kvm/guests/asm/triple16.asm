# triple16 (real mode): load an IDT with limit 0 and execute ud2. The #UD
# vector lies outside the IDT (#GP, then #DF, neither deliverable), so the
# CPU triple-faults: the VMM sees a shutdown exit.
.intel_syntax noprefix
.code16
.text
.include "abi.inc"
.globl _start
_start:
    cli
    xor ax, ax
    mov ds, ax
    lidt [idtr]
    ud2
    jmp park16                    # not reached

idtr: .word 0                     # limit 0: no vector is valid
      .long 0

.include "lib16.inc"
