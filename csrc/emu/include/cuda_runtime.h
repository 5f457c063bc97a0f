// CPU emulation: see csrc/emu/emu.h.
#pragma once
#include "../emu.h"
