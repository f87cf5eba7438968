export {
  MeshClient,
  SUBPROTOCOL,
  PROTOCOL_VERSION,
  type MeshClientOptions,
  type ReconnectOptions,
  type TokenSource,
  type WebSocketConstructor,
  type WebSocketLike,
  type ConnectionState,
  type StateChange,
  type Welcome,
  type MeshEvent,
  type EventHandler,
  type CallResult,
  type SubscribeOptions,
  type PositionLike,
  type HistoryOptions,
  type HistoryResult,
  type Unrecovered,
} from './client.js';
export { MeshError, ConnectionClosedError, RequestTimeoutError, errorCodeName } from './errors.js';
export { ErrorCode, EventType, Opcode } from './gen/meshd/fb/client.js';
export { encodeFrame, decodeFrame, splitBatch, type InFrame, type OutFrame, type Position } from './frames.js';
export { uuidToString, uuidFromString } from './uuid.js';
export { jwtExpiry } from './jwt.js';
