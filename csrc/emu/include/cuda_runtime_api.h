// CPU emulation of the CUDA runtime API subset pyfast's launchers and host files use (tests only;
// see csrc/emu/emu.h). Shadows the toolkit's header: csrc/emu/include comes first on the include path.
#pragma once
#include "../emu.h"
