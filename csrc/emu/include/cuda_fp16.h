// CPU emulation: see csrc/emu/emu.h (half and bfloat16 live there, with the device's rounding).
#pragma once
#include "../emu.h"
