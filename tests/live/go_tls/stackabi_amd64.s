// Go's stack ABI on amd64 (ABI0, what Go before 1.17 compiles every function to), written out
// for the live test of the collector's stack-ABI uprobes (stackabi_amd64.go says why). Each
// function copies its arguments into its own frame, calls the Go function that does the TLS
// call, and copies its results back, so that at each RET they sit after the arguments: c at
// 8(SP), b at 16(SP) to 32(SP), n at 40(SP), err at 48(SP), as the program reads them.
// stackWriteSplit does what Go 1.16's (*Conn).Write does over TLS 1.0 with a CBC cipher: it
// writes b's first byte alone, then the rest after b = b[1:] (so b's slot in its argument frame
// no longer holds the pointer it was called with), and returns n + 1.

#include "textflag.h"
#include "funcdata.h"

// func stackRead(c *tls.Conn, b []byte) (int, error)
TEXT ·stackRead(SB), 0, $56-56
	// The arguments keep c and b alive for the garbage collector; the frame's copies need no map.
	NO_LOCAL_POINTERS
	MOVQ c+0(FP), AX
	MOVQ AX, 0(SP)
	MOVQ b_base+8(FP), AX
	MOVQ AX, 8(SP)
	MOVQ b_len+16(FP), AX
	MOVQ AX, 16(SP)
	MOVQ b_cap+24(FP), AX
	MOVQ AX, 24(SP)
	CALL ·goRead(SB)
	MOVQ 32(SP), AX
	MOVQ AX, ret+32(FP)
	MOVQ 40(SP), AX
	MOVQ AX, ret1_itable+40(FP)
	MOVQ 48(SP), AX
	MOVQ AX, ret1_data+48(FP)
	RET

// func stackWrite(c *tls.Conn, b []byte) (int, error)
TEXT ·stackWrite(SB), 0, $56-56
	NO_LOCAL_POINTERS
	MOVQ c+0(FP), AX
	MOVQ AX, 0(SP)
	MOVQ b_base+8(FP), AX
	MOVQ AX, 8(SP)
	MOVQ b_len+16(FP), AX
	MOVQ AX, 16(SP)
	MOVQ b_cap+24(FP), AX
	MOVQ AX, 24(SP)
	CALL ·goWrite(SB)
	MOVQ 32(SP), AX
	MOVQ AX, ret+32(FP)
	MOVQ 40(SP), AX
	MOVQ AX, ret1_itable+40(FP)
	MOVQ 48(SP), AX
	MOVQ AX, ret1_data+48(FP)
	RET

// func stackWriteSplit(c *tls.Conn, b []byte) (int, error)
TEXT ·stackWriteSplit(SB), 0, $56-56
	NO_LOCAL_POINTERS
	MOVQ b_len+16(FP), AX
	CMPQ AX, $1
	JLE whole
	MOVQ c+0(FP), AX
	MOVQ AX, 0(SP)
	MOVQ b_base+8(FP), AX
	MOVQ AX, 8(SP)
	MOVQ $1, 16(SP)
	MOVQ $1, 24(SP)
	CALL ·goWrite(SB)
	// b = b[1:], in its own slot
	INCQ b_base+8(FP)
	DECQ b_len+16(FP)
	DECQ b_cap+24(FP)
	MOVQ c+0(FP), AX
	MOVQ AX, 0(SP)
	MOVQ b_base+8(FP), AX
	MOVQ AX, 8(SP)
	MOVQ b_len+16(FP), AX
	MOVQ AX, 16(SP)
	MOVQ b_cap+24(FP), AX
	MOVQ AX, 24(SP)
	CALL ·goWrite(SB)
	MOVQ 32(SP), AX
	INCQ AX
	MOVQ AX, ret+32(FP)
	MOVQ 40(SP), AX
	MOVQ AX, ret1_itable+40(FP)
	MOVQ 48(SP), AX
	MOVQ AX, ret1_data+48(FP)
	RET
whole:
	MOVQ c+0(FP), AX
	MOVQ AX, 0(SP)
	MOVQ b_base+8(FP), AX
	MOVQ AX, 8(SP)
	MOVQ b_len+16(FP), AX
	MOVQ AX, 16(SP)
	MOVQ b_cap+24(FP), AX
	MOVQ AX, 24(SP)
	CALL ·goWrite(SB)
	MOVQ 32(SP), AX
	MOVQ AX, ret+32(FP)
	MOVQ 40(SP), AX
	MOVQ AX, ret1_itable+40(FP)
	MOVQ 48(SP), AX
	MOVQ AX, ret1_data+48(FP)
	RET
